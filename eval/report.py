"""From raw A/B samples to the summary, the markdown table and the plots.

Everything here works on the JSON-shaped result (plain dicts), so ``scripts/patch_tables.py`` can
re-render tables from a committed result file without torch or a model.
"""
from __future__ import annotations

import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)

REFERENCE = "reference"
UPSTREAM = "upstream"  # the row of an upstream checkout run by --upstream
# The headline figures are read from these text sets when the run has them (else the first/last).
LATENCY_TEXT = "short"
THROUGHPUT_TEXT = "long"
STAGE_ORDER = ("conditionals", "t3", "t3_prefill", "t3_decode", "s3gen", "flow_encoder", "cfm", "hift", "watermark")
# Stacked bars: the fine split where it was measured, else the coarse stage it refines (upstream's
# rows have T3 and S3Gen totals only).
PLOT_GROUPS = (("conditionals", ()), ("t3", ("t3_prefill", "t3_decode")), ("s3gen", ("flow_encoder", "cfm", "hift")),
               ("watermark", ()))


# ---------------------------------------------------------------------------------------- numbers
def num(x) -> float:
    """A JSON number back to float: None -> nan, the strings "inf"/"-inf" -> +-inf."""
    if x is None:
        return math.nan
    if isinstance(x, str):
        return float(x)
    return float(x)


def p50(values) -> float:
    vals = [v for v in (num(x) for x in values) if not math.isnan(v)]
    return float(np.median(vals)) if vals else math.nan


def p95(values) -> float:
    vals = [v for v in (num(x) for x in values) if not math.isnan(v)]
    return float(np.percentile(vals, 95)) if vals else math.nan


def jsonable(obj):
    """Floats made strict-JSON safe: nan -> None, +-inf -> "inf"/"-inf" (``num`` reads them back)."""
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return jsonable(obj.item())
    return obj


def _pick_text(texts: list[str], preferred: str, last: bool) -> str | None:
    if not texts:
        return None
    if preferred in texts:
        return preferred
    return texts[-1] if last else texts[0]


# ---------------------------------------------------------------------------------------- summary
def summarize_text(samples: list[dict], fidelity: dict | None) -> dict:
    """Figures of one (config, text) pair from its samples."""
    synth = [s for s in samples if s["kind"] == "synth"]
    stream = [s for s in samples if s["kind"] == "stream"]
    out: dict = {"reps": len(synth)}
    if synth:
        t3_s = [num(s["stages"].get("t3")) for s in synth]
        tokens = [int(s["t3_tokens"]) for s in synth]
        prefill = [num(s.get("t3_prefill_s")) for s in synth]
        tok_s = [n / t if t > 0 else math.nan for n, t in zip(tokens, t3_s)]
        decode_ms = [1000.0 * (t - p) / (n - 1) if n > 1 else math.nan for n, t, p in zip(tokens, t3_s, prefill)]
        out.update(
            rtf=p50(s["total_s"] / s["audio_s"] if s["audio_s"] > 0 else math.nan for s in synth),
            total_s=p50(s["total_s"] for s in synth),
            audio_s=p50(s["audio_s"] for s in synth),
            t3_tokens=int(np.median(tokens)),
            t3_tokens_exact=all(s.get("t3_tokens_exact", False) for s in synth),
            t3_tokens_per_s=p50(tok_s),
            t3_ms_per_token=1000.0 / p50(tok_s) if p50(tok_s) > 0 else math.nan,
            t3_prefill_s=p50(prefill),
            t3_decode_ms_per_token=p50(decode_ms),
        )
        stages: dict[str, list[float]] = defaultdict(list)
        for s in synth:
            st = s["stages"]
            enc = num(s.get("flow_encoder_s"))
            stages["conditionals"].append(num(st.get("conditionals", 0.0)))
            stages["t3_prefill"].append(num(s.get("t3_prefill_s")))
            stages["t3_decode"].append(num(st.get("t3")) - num(s.get("t3_prefill_s")))
            stages["t3"].append(num(st.get("t3")))
            stages["flow"].append(num(st.get("flow", math.nan)))
            stages["flow_encoder"].append(enc)
            stages["cfm"].append(num(st.get("flow", math.nan)) - enc)
            stages["hift"].append(num(st.get("hift", math.nan)))
            stages["s3gen"].append(num(st["s3gen"]) if "s3gen" in st
                                   else num(st.get("flow", math.nan)) + num(st.get("hift", math.nan)))
            stages["watermark"].append(num(st.get("watermark", 0.0)))
        out["stages_s"] = {k: p50(v) for k, v in stages.items()}
    if stream:
        out.update(
            ttfa_p50_s=p50(s["ttfa_s"] for s in stream),
            ttfa_p95_s=p95(s["ttfa_s"] for s in stream),
            ttfa_samples_s=[s["ttfa_s"] for s in stream],
            stream_rtf=p50(s["total_s"] / s["audio_s"] if s["audio_s"] > 0 else math.nan for s in stream),
            stream_chunks=int(np.median([s["chunks"] for s in stream])),
        )
    if fidelity:
        keys = ("token_agreement", "mel_snr_db", "wav_snr_db", "spec_snr_db", "e2e_wav_snr_db")
        out.update({k: fidelity[k] for k in keys if k in fidelity})
    return out


def summarize(result: dict) -> dict:
    """``summary`` keyed by config name: headline figures, per-text detail and ratios to reference."""
    samples = result.get("samples", [])
    fidelity = result.get("fidelity", {})
    names = [c["name"] for c in result.get("configs", [])]
    texts = list(result.get("settings", {}).get("text_sets", {}))
    lat_text = _pick_text(texts, LATENCY_TEXT, last=False)
    thr_text = _pick_text(texts, THROUGHPUT_TEXT, last=True)
    summary: dict = {}
    for name in names:
        mine = [s for s in samples if s["config"] == name]
        by_text = {t: summarize_text([s for s in mine if s.get("text") == t], fidelity.get(name, {}).get(t))
                   for t in texts}
        thr = by_text.get(thr_text, {})
        lat = by_text.get(lat_text, {})
        mem = [num(s["peak_mem_gb"]) for s in mine if s["kind"] == "memory"]
        mem = [m for m in mem if not math.isnan(m)]
        summary[name] = {
            "t3_tokens_per_s": thr.get("t3_tokens_per_s", math.nan),
            "t3_ms_per_token": thr.get("t3_ms_per_token", math.nan),
            "t3_decode_ms_per_token": thr.get("t3_decode_ms_per_token", math.nan),
            "t3_prefill_s": thr.get("t3_prefill_s", math.nan),
            "ttfa_p50_s": lat.get("ttfa_p50_s", math.nan),
            "ttfa_p95_s": lat.get("ttfa_p95_s", math.nan),
            "stream_rtf": thr.get("stream_rtf", math.nan),
            "rtf": thr.get("rtf", math.nan),
            "prepare_conditionals_s": p50(s["prepare_conditionals_s"] for s in mine if s["kind"] == "conds"),
            "peak_mem_gb": max(mem) if mem else math.nan,
            "snr_db_vs_reference": thr.get("wav_snr_db", math.nan),
            "mel_snr_db_vs_reference": thr.get("mel_snr_db", math.nan),
            "spec_snr_db_vs_reference": thr.get("spec_snr_db", math.nan),
            "token_agreement": thr.get("token_agreement", math.nan),
            "e2e_wav_snr_db_vs_reference": thr.get("e2e_wav_snr_db", math.nan),
            "stages_s": thr.get("stages_s", {}),
            "headline_texts": {"latency": lat_text, "throughput": thr_text},
            "by_text": by_text,
        }
    ref, up = summary.get(REFERENCE), summary.get(UPSTREAM)
    for name, s in summary.items():
        s["vs_reference"] = ratios(s, ref) if ref else {}
        if up:
            s["vs_upstream"] = ratios(s, up)
    return summary


# "higher is better" ratios: > 1 means the config beats reference.
_FASTER_WHEN_LOWER = ("t3_ms_per_token", "ttfa_p50_s", "ttfa_p95_s", "stream_rtf", "rtf", "prepare_conditionals_s")


def ratios(s: dict, ref: dict) -> dict:
    out = {}
    a, b = num(s.get("t3_tokens_per_s")), num(ref.get("t3_tokens_per_s"))
    out["t3_tokens_per_s"] = a / b if b > 0 else math.nan
    for key in _FASTER_WHEN_LOWER:
        a, b = num(s.get(key)), num(ref.get(key))
        out[key] = b / a if a > 0 else math.nan
    a, b = num(s.get("peak_mem_gb")), num(ref.get("peak_mem_gb"))
    out["peak_mem_gb"] = a / b if b > 0 else math.nan  # a memory ratio: < 1 is smaller
    return out


# ---------------------------------------------------------------------------------------- table
def _fmt(value, scale: float = 1.0, digits: int = 1) -> str:
    v = num(value)
    if math.isnan(v):
        return "-"
    if math.isinf(v):
        return "exact" if v > 0 else "-inf"
    return f"{v * scale:.{digits}f}"


def _with_ratio(key: str, scale: float, digits: int) -> Callable[[str, dict], str]:
    def cell(name: str, s: dict) -> str:
        text = _fmt(s.get(key), scale, digits)
        r = num(s.get("vs_reference", {}).get(key))
        if name != REFERENCE and text != "-" and not math.isnan(r):
            text += f" ({r:.2f}×)"
        return text
    return cell


def _plain(key: str, scale: float, digits: int) -> Callable[[str, dict], str]:
    return lambda name, s: _fmt(s.get(key), scale, digits)


# column key -> (header, cell renderer)
COLUMNS: dict[str, tuple[str, Callable[[str, dict], str]]] = {
    "t3_tokens_per_s": ("T3 tok/s", _with_ratio("t3_tokens_per_s", 1.0, 1)),
    "t3_ms_per_token": ("T3 ms/tok", _plain("t3_ms_per_token", 1.0, 2)),
    "t3_decode_ms_per_token": ("decode ms/tok", _plain("t3_decode_ms_per_token", 1.0, 2)),
    "ttfa_p50_s": ("TTFA p50 ms", _with_ratio("ttfa_p50_s", 1000.0, 0)),
    "ttfa_p95_s": ("TTFA p95 ms", _plain("ttfa_p95_s", 1000.0, 0)),
    "stream_rtf": ("stream RTF", _with_ratio("stream_rtf", 1.0, 3)),
    "rtf": ("RTF", _with_ratio("rtf", 1.0, 3)),
    "prepare_conditionals_s": ("prep. conds ms", _with_ratio("prepare_conditionals_s", 1000.0, 0)),
    "peak_mem_gb": ("peak GB", _plain("peak_mem_gb", 1.0, 2)),
    "snr_db_vs_reference": ("wav SNR dB", _plain("snr_db_vs_reference", 1.0, 1)),
    "mel_snr_db_vs_reference": ("mel SNR dB", _plain("mel_snr_db_vs_reference", 1.0, 1)),
    "spec_snr_db_vs_reference": ("spec SNR dB", _plain("spec_snr_db_vs_reference", 1.0, 1)),
    "token_agreement": ("token agree", _plain("token_agreement", 1.0, 3)),
}


def _vs_upstream(key: str) -> Callable[[str, dict], str]:
    def cell(name: str, s: dict) -> str:
        r = num(s.get("vs_upstream", {}).get(key))
        return "-" if math.isnan(r) or name == UPSTREAM else f"{r:.2f}×"
    return cell


# Ratios to the upstream row (> 1× = better), shown by default when the result has one.
UPSTREAM_COLUMNS: dict[str, tuple[str, Callable[[str, dict], str]]] = {
    "t3_tokens_per_s_vs_upstream": ("T3 ×upstream", _vs_upstream("t3_tokens_per_s")),
    "ttfa_p50_s_vs_upstream": ("TTFA ×upstream", _vs_upstream("ttfa_p50_s")),
    "stream_rtf_vs_upstream": ("stream RTF ×upstream", _vs_upstream("stream_rtf")),
    "rtf_vs_upstream": ("RTF ×upstream", _vs_upstream("rtf")),
}
COLUMNS.update(UPSTREAM_COLUMNS)
DEFAULT_COLUMNS = tuple(k for k in COLUMNS if k not in UPSTREAM_COLUMNS)


def markdown_table(result: dict, configs: list[str] | None = None, columns: list[str] | None = None) -> str:
    """The summary as a markdown table (ratios to reference in parentheses, > 1× = better)."""
    summary = result["summary"]
    configs = configs or list(summary)
    if not columns:
        columns = list(DEFAULT_COLUMNS) + (list(UPSTREAM_COLUMNS) if UPSTREAM in summary else [])
    for c in configs:
        if c not in summary:
            raise KeyError(f"config {c!r} is not in the result (has: {', '.join(summary)})")
    for c in columns:
        if c not in COLUMNS:
            raise KeyError(f"unknown column {c!r}; known: {', '.join(COLUMNS)}")
    head = "| config | " + " | ".join(COLUMNS[c][0] for c in columns) + " |"
    rule = "|---|" + "---|" * len(columns)
    rows = ["| " + " | ".join([f"`{name}`"] + [COLUMNS[c][1](name, summary[name]) for c in columns]) + " |"
            for name in configs]
    return "\n".join([head, rule, *rows])


def caption(result: dict) -> str:
    env = result.get("env", {})
    ck = result.get("checkpoint", {})
    st = result.get("settings", {})
    first = next(iter(result.get("summary", {}).values()), {})
    heads = first.get("headline_texts", {})
    lat, thr = heads.get("latency", "-"), heads.get("throughput", "-")
    commit = str(env.get("git_commit") or "?")[:10]
    return (f"{env.get('device_name', '?')} · torch {env.get('torch', '?')} · commit {commit}"
            f" · {ck.get('kind', '?')} weights · {st.get('reps', '?')} reps · seed {st.get('seed', '?')}"
            f" · TTFA on `{lat}`, throughput/RTF on `{thr}` · ratios to `reference` in parentheses (> 1× is better)")


def markdown_report(result: dict) -> str:
    lines = [f"# A/B: {', '.join(result.get('summary', {}))}", "", caption(result), "", markdown_table(result), ""]
    stages = stage_table(result)
    if stages:
        lines += ["## Stage times (p50, ms, throughput text)", "", stages, ""]
    for note in result.get("notes", []):
        lines.append(f"- {note}")
    up = result.get("upstream")
    if up:
        versions = ", ".join(f"{k} {v}" for k, v in (up.get("versions") or {}).items() if v)
        detail = up.get("reason") or versions
        lines.append(f"- upstream ({up.get('path', '?')}): {up.get('status')}" + (f" ({detail})" if detail else ""))
    return "\n".join(lines).rstrip() + "\n"


def stage_table(result: dict) -> str:
    summary = result.get("summary", {})
    if not summary:
        return ""
    head = "| config | " + " | ".join(STAGE_ORDER) + " |"
    rule = "|---|" + "---|" * len(STAGE_ORDER)
    rows = ["| " + " | ".join([f"`{n}`"] + [_fmt(s.get("stages_s", {}).get(k), 1000.0, 1) for k in STAGE_ORDER])
            + " |" for n, s in summary.items()]
    return "\n".join([head, rule, *rows])


# ---------------------------------------------------------------------------------------- plots
def write_plots(result: dict, stem: Path) -> tuple[list[Path], str | None]:
    """``STEM-latency.png`` and ``STEM-stages.png``; returns (paths, note when skipped)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "plots skipped: matplotlib is not installed (pip install 'chatterbox-fast[eval]')"
    summary = result["summary"]
    names = list(summary)
    paths = []

    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(names)), 3.6))
    ttfa = [[1000.0 * num(v) for v in s["by_text"].get(s["headline_texts"]["latency"], {}).get("ttfa_samples_s", [])]
            for s in summary.values()]
    if any(ttfa):
        data, label = ttfa, "time to first audio (ms)"
    else:
        data = [[1000.0 * num(x["total_s"]) for x in result["samples"]
                 if x["config"] == n and x["kind"] == "synth" and x.get("text") == s["headline_texts"]["throughput"]]
                for n, s in summary.items()]
        label = "non-streaming wall time (ms), no streaming data"
    ax.boxplot([d or [math.nan] for d in data], showfliers=False)
    for i, d in enumerate(data, start=1):  # every repetition, slightly spread
        ax.scatter(i + np.linspace(-0.08, 0.08, len(d)) if len(d) > 1 else [i] * len(d), d, s=8, alpha=0.6)
    ax.set_ylabel(label)
    ax.set_xticks(range(1, len(names) + 1), names, rotation=20, ha="right", fontsize=8)
    ax.set_title("latency per configuration")
    fig.tight_layout()
    paths.append(stem.parent / f"{stem.name}-latency.png")
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7.0, 0.6 * len(names) + 2.2))
    colors = {key: f"C{i}" for i, key in enumerate(STAGE_ORDER)}
    left = np.zeros(len(names))
    labelled = set()
    for row, n in enumerate(names):
        st = summary[n]["stages_s"]
        for coarse, fine in PLOT_GROUPS:
            split = [k for k in fine if not math.isnan(num(st.get(k)))]
            for key in (fine if fine and len(split) == len(fine) else (coarse,)):
                ms = 1000.0 * num(st.get(key, math.nan))
                if math.isnan(ms) or ms <= 0:
                    continue
                ax.barh(row, ms, left=left[row], color=colors[key], label=None if key in labelled else key)
                labelled.add(key)
                left[row] += ms
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("ms (p50 per stage, non-streaming)")
    ax.invert_yaxis()
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.22),
              frameon=False, handlelength=1.0, columnspacing=0.8)
    ax.set_title("stage breakdown")
    fig.tight_layout()
    paths.append(stem.parent / f"{stem.name}-stages.png")
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)
    return paths, None
