"""Old commit vs new commit on one machine, in one device session: the A/B figures and the
fresh-process memory of one configuration, each tree measured by its own harness.

    python -m eval.regression run --tree OLD_DIR --label old --commit SHA --out $OUT/old [--configs fast]
    python -m eval.regression run --tree .       --label new --commit SHA --out $OUT/new
    python -m eval.regression merge --old $OUT/old --new $OUT/new --out eval/results/NAME [--tolerance 0.03]

``run`` starts ``python -m eval.ab`` and ``python -m eval.memory`` as subprocesses inside ``--tree``
(its own ``src`` on the path), so each commit is timed by the harness it shipped with. ``merge``
lines the two up figure by figure: for each, old, new, new/old, and whether new is worse than old by
more than ``--tolerance`` (lower is better for times, RTFs and memory; higher for tokens per second).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

# figure -> True when higher is better
FIGURES = {"t3_tokens_per_s": True, "ttfa_p50_s": False, "ttfa_p95_s": False, "stream_rtf": False, "rtf": False,
           "prepare_conditionals_s": False}
MEMORY_FIGURE = "peak_gb"


def run(args: argparse.Namespace) -> int:
    tree = Path(args.tree).resolve()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{tree / 'src'}{os.pathsep}{tree}", "PYTHONUNBUFFERED": "1"}
    ab = [sys.executable, "-m", "eval.ab", "--device", args.device, "--configs", args.configs, "--reps", str(args.reps),
          "--commit", args.commit, "--out", str(out / "ab")]
    mem = [sys.executable, "-m", "eval.memory", "--device", args.device, "--config", args.memory_config,
           "--commit", args.commit, "--out", str(out / "memory")]
    for cmd in ([ab] if not args.skip_ab else []) + ([mem] if not args.skip_memory else []):
        print("+", " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, cwd=tree, env=env)
        if proc.returncode:
            return proc.returncode
    (out / "label.json").write_text(json.dumps({"label": args.label, "commit": args.commit, "tree": str(tree)}))
    return 0


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def merge(args: argparse.Namespace) -> int:
    sides = {}
    for side in ("old", "new"):
        d = Path(getattr(args, side))
        sides[side] = {"label": _load(d / "label.json") or {}, "ab": _load(d / "ab.json"),
                       "memory": _load(d / "memory.json")}
    config = args.config
    rows = []
    for name, higher in FIGURES.items():
        old = (sides["old"]["ab"] or {}).get("summary", {}).get(config, {}).get(name)
        new = (sides["new"]["ab"] or {}).get("summary", {}).get(config, {}).get(name)
        rows.append(_row(name, old, new, higher, args.tolerance))
    old_mem = (sides["old"]["memory"] or {}).get(MEMORY_FIGURE)
    new_mem = (sides["new"]["memory"] or {}).get(MEMORY_FIGURE)
    rows.append(_row("fresh_process_peak_gb", old_mem, new_mem, False, args.tolerance))
    result = {"schema": "chatterbox-fast/regression/1", "config": config, "tolerance": args.tolerance,
              "old": {k: sides["old"]["label"].get(k) for k in ("label", "commit")},
              "new": {k: sides["new"]["label"].get(k) for k in ("label", "commit")},
              "env": (sides["new"]["ab"] or {}).get("env") or (sides["new"]["memory"] or {}).get("environment"),
              "figures": rows, "regressed": [r["figure"] for r in rows if r["worse"]],
              "old_ab_summary": (sides["old"]["ab"] or {}).get("summary"),
              "new_ab_summary": (sides["new"]["ab"] or {}).get("summary"),
              "old_memory": sides["old"]["memory"], "new_memory": sides["new"]["memory"]}
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [f"# Regression: {config}, old {result['old']['commit']} vs new {result['new']['commit']}", "",
             "| figure | old | new | new/old | worse than tolerance |", "|---|---|---|---|---|"]
    for r in rows:
        fmt = lambda v: "n/a" if v is None else f"{v:.4g}"  # noqa: E731
        lines.append(f"| {r['figure']} | {fmt(r['old'])} | {fmt(r['new'])} | {fmt(r['ratio'])} | "
                     f"{'YES' if r['worse'] else 'no'} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _row(name: str, old, new, higher_better: bool, tol: float) -> dict:
    if old is None or new is None:
        return {"figure": name, "old": old, "new": new, "ratio": None, "worse": False}
    ratio = new / old if old else None
    worse = ratio is not None and (ratio < 1 - tol if higher_better else ratio > 1 + tol)
    return {"figure": name, "old": old, "new": new, "ratio": ratio, "worse": worse,
            "higher_is_better": higher_better}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--tree", required=True)
    r.add_argument("--label", required=True)
    r.add_argument("--commit", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--device", default="cuda")
    r.add_argument("--configs", default="fast")
    r.add_argument("--memory-config", default="fast")
    r.add_argument("--reps", type=int, default=3)
    r.add_argument("--skip-ab", action="store_true")
    r.add_argument("--skip-memory", action="store_true")
    m = sub.add_parser("merge")
    m.add_argument("--old", required=True)
    m.add_argument("--new", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--config", default="fast")
    m.add_argument("--tolerance", type=float, default=0.03)
    args = ap.parse_args(argv)
    return run(args) if args.cmd == "run" else merge(args)


if __name__ == "__main__":
    raise SystemExit(main())
