#!/usr/bin/env python3
"""Regenerate the measured tables inside patches/*.md from committed eval/results JSON files.

    python scripts/patch_tables.py            # rewrite every table in patches/*.md (not README.md) in place
    python scripts/patch_tables.py --check    # exit 1 when a table differs from its JSON
    python scripts/patch_tables.py FILE.md ...

A table lives between two markers; everything between them is owned by this script:

    <!-- table:eval/results/NAME.json -->
    <!-- /table -->

    <!-- table:eval/results/NAME.json:reference,fast:t3_tokens_per_s,rtf,snr_db_vs_reference -->
    <!-- /table -->

    <!-- stages:eval/results/NAME.json:reference,fast -->
    <!-- /stages -->

``table`` renders the summary (optional config list, optional column list: see eval/report.py
COLUMNS); ``stages`` renders the per-stage p50 times. Paths are relative to the repository root.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eval import report  # noqa: E402

MARKER = re.compile(
    r"(?P<open><!-- (?P<kind>table|stages|t3variants|smallm|conds):(?P<path>[^:\s>]+)"
    r"(?::(?P<configs>[^:\s>]*))?(?::(?P<columns>[^:\s>]*))? -->)"
    r"\n(?P<body>.*?)(?P<close><!-- /(?P=kind) -->)",
    re.S,
)


class TableError(Exception):
    pass


def _split(field: str | None) -> list[str] | None:
    items = [x for x in (field or "").split(",") if x]
    return items or None


def load_result(path: Path) -> dict:
    if not path.is_file():
        raise TableError(f"result file not found: {path}")
    result = json.loads(path.read_text())
    schema = result.get("schema", "")
    if schema.startswith(("chatterbox-fast/t3-variants/", "chatterbox-fast/profile-conds/")) or "calls_per_graph" in result:
        return result
    if "summary" not in result:
        result["summary"] = report.summarize(result)
    return result


def t3_variants_table(result: dict, configs: list[str] | None) -> str:
    """A ``python -m eval.t3_variants`` result: per config ms/token, tokens/s, ratio to the first config."""
    rows = ["| config | T3 ms/token | T3 tok/s | vs first | warm-up s | peak GB |", "|---|---|---|---|---|---|"]
    for r in result["configs"]:
        if configs and r["config"] not in configs:
            continue
        peak = r.get("peak_mem_gb")
        rows.append(f"| `{r['config']}` | {r['ms_per_token']:.3f} | {r['tokens_per_s']:.1f} | "
                    f"{r['speedup_vs_first']:.2f}x | {r['warmup_s']:.1f} | "
                    f"{'n/a' if peak is None else f'{peak:.2f}'} |")
    return "\n".join(rows)


def t3_variants_caption(result: dict) -> str:
    env, st = result["environment"], result["settings"]
    return (f"{env.get('device_name', env.get('device'))} · torch {env.get('torch')} · commit "
            f"{str(env.get('git_commit'))[:10]} · synthetic weights · {st['tokens']} tokens · {st['reps']} reps "
            f"(median) · configs run one after another")


def small_m_table(result: dict) -> str:
    """An ``eval/bench_small_m_linear.py`` result: per shape cuBLAS vs the kernel (and the sweep's best)."""
    rows = ["| shape (M, N, K) | F.linear us | GB/s | small_m_linear us | GB/s | speed-up | best swept us |",
            "|---|---|---|---|---|---|---|"]
    for name, r in result["shapes"].items():
        best = min((c["us"] for c in r.get("sweep", []) if "us" in c), default=None)
        rows.append(f"| {name} {tuple(r['shape'])} | {r['F.linear']['us']:.2f} | {r['F.linear']['gb_s']:.0f} | "
                    f"{r['small_m_linear']['us']:.2f} | {r['small_m_linear']['gb_s']:.0f} | {r['speedup']:.2f}x | "
                    f"{'n/a' if best is None else f'{best:.2f}'} |")
    return "\n".join(rows)


def small_m_caption(result: dict) -> str:
    env = result["env"]
    return (f"{env.get('device_name')} · torch {env.get('torch')} · triton {env.get('triton')} · commit "
            f"{str(env.get('git_commit'))[:10]} · M = {result['rows']} · {result['dtype']} · "
            f"{'hot' if result['hot'] else 'cold'} weights · {result['calls_per_graph']} calls per graph · "
            f"{result['reps']} reps (median)")


def conds_table(result: dict) -> str:
    """An ``eval/profile_conds.py`` result: totals, GPU kernel time and launches, stage medians."""
    t, k = result["totals"], result.get("kernels") or {}
    rows = ["| opt | tts_total ms | voice_total ms | host ms | GPU kernel ms | launches | syncs |",
            "|---|---|---|---|---|---|---|",
            f"| `{result['settings'].get('opt')}` | {t['tts_total']['median_ms']:.1f} | "
            f"{t['voice_total']['median_ms']:.1f} | {t['voice_host']['median_ms']:.1f} | "
            f"{k.get('gpu_kernel_ms', float('nan')):.1f} | {k.get('kernel_launches', 'n/a')} | "
            f"{(result.get('syncs') or {}).get('count', 'n/a')} |", "",
            "| stage | " + " | ".join(result["stages"]) + " |",
            "|---|" + "---|" * len(result["stages"]),
            "| ms | " + " | ".join(f"{v['median_ms']:.2f}" for v in result["stages"].values()) + " |"]
    return "\n".join(rows)


def conds_caption(result: dict) -> str:
    env, st = result["env"], result["settings"]
    return (f"{env.get('device_name')} · torch {env.get('torch')} · commit {str(env.get('git_commit'))[:10]} · "
            f"synthetic weights · {st.get('reference_seconds', 10)} s reference · {st.get('reps')} reps (median)")


def render(kind: str, result: dict, configs: list[str] | None, columns: list[str] | None) -> str:
    if kind == "conds":
        return conds_table(result)
    if kind == "smallm":
        return small_m_table(result)
    if kind == "t3variants":
        return t3_variants_table(result, configs)
    if kind == "stages":
        sub = dict(result, summary={k: v for k, v in result["summary"].items() if not configs or k in configs})
        return report.stage_table(sub)
    try:
        return report.markdown_table(result, configs, columns)
    except KeyError as exc:
        raise TableError(str(exc.args[0])) from exc


def rewrite(text: str, root: Path = ROOT, cache: dict | None = None) -> str:
    """``text`` with every marked table regenerated."""
    cache = {} if cache is None else cache

    def repl(m: re.Match) -> str:
        path = (root / m["path"]).resolve()
        if path not in cache:
            cache[path] = load_result(path)
        result = cache[path]
        body = render(m["kind"], result, _split(m["configs"]), _split(m["columns"]))
        captions = {"t3variants": t3_variants_caption, "smallm": small_m_caption, "conds": conds_caption}
        caption = captions.get(m["kind"], report.caption)(result)
        return f"{m['open']}\n_{caption}_\n\n{body}\n{m['close']}"

    return MARKER.sub(repl, text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", type=Path, help="markdown files (default: patches/*.md)")
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 when a table drifted")
    ap.add_argument("--root", type=Path, default=ROOT, help="where result paths are relative to")
    args = ap.parse_args(argv)
    # README.md documents the markers (with examples): it holds no tables of its own
    files = args.files or sorted(f for f in (args.root / "patches").glob("*.md") if f.name != "README.md")
    cache: dict = {}
    drifted, tables = [], 0
    for f in files:
        text = f.read_text()
        tables += len(MARKER.findall(text))
        try:
            new = rewrite(text, args.root, cache)
        except (TableError, json.JSONDecodeError) as exc:
            print(f"{f}: {exc}", file=sys.stderr)
            return 2
        if new != text:
            drifted.append(f)
            if not args.check:
                f.write_text(new)
    verb = "differ from their results" if args.check else "rewritten"
    for f in drifted:
        print(f"{f}: {verb}")
    print(f"{tables} table(s) in {len(files)} file(s); {len(drifted)} file(s) {verb}")
    return 1 if args.check and drifted else 0


if __name__ == "__main__":
    sys.exit(main())
