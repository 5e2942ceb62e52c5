"""Chatterbox-Nano (and Turbo) on the CPU, ours beside pinned upstream in the same run (issue 16's target:
Nano's streaming RTF <= 1.0 on 2 CPU cores, measured against upstream Nano).

    python -m eval.cpu_turbo [--models nano,turbo] [--reps 5] [--max-new-tokens 100] \\
        [--opts cpu,reference] [--schedules "25;25,50,100"] [--upstream-python /tmp/upvenv/bin/python] \\
        [--out eval/results/cpu-nano]

Both sides load the same synthetic checkpoint directory (published layout, written once under
``~/.cache/chatterbox-fast``; ``--ckpt`` to reuse one) and make their voice from the same 10 s
reference file with their own ``prepare_conditionals`` (loudness-normalised). Every round runs, one
after another on the same cores (nothing overlaps): for each OptConfig of ours, ``synthesize``
(= ``generate``) and ``generate_stream`` for each chunk schedule; then upstream's ``generate``
(``eval/upstream_turbo_driver.py`` in upstream's side environment, kept running between rounds).
Every call speaks the same text with the same seed and the same token budget (synthetic weights
rarely stop, so the budget sets the length: 100 tokens = 4 s of audio), without the watermark.
Upstream has no streaming API for these models: its ``generate`` is the comparison.

Figures are medians over ``--reps`` rounds after ``--warmup`` untimed ones: RTF (wall time / audio
seconds), time to first audio (the first ``next()`` of the stream), T3 time per token, and for the
stream where its time goes (T3, flow and vocoder summed over chunks, per chunk). The machine (cores,
load average before and during the run), torch and the commit go into NAME.json with NAME.md.

An OptConfig whose T3 is quantised (``t3.quantize``) also gets its fidelity against float32 T3
before the timed rounds: both teacher-forced on the tokens float32 T3 samples for the text (seed
``--seed``), per position the relative error of the speech logits, whether the top-1 id agrees, and
the KL divergence of the sampling distribution at the sampling temperature (float32's from int8's).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from . import report, stages
from .texts import TEXT_SETS, TextCase, reference_audio
from .upstream_turbo import DEFAULT_PYTHON, SAMPLING, UpstreamTurbo, checkpoint_dir, upstream_python, write_reference

log = logging.getLogger("eval.cpu_turbo")

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = "chatterbox-fast/cpu-turbo/1"
RTF_TARGET = 1.0


# ---------------------------------------------------------------------------------------- inputs
def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "loadavg_before": list(os.getloadavg())}


# ---------------------------------------------------------------------------------------- ours
def short_voice(tts, reference: Path, seconds: float):
    """A second voice from the first ``seconds`` of the reference (S3Gen's prompt is then shorter)."""
    import soundfile as sf

    wav, sr = sf.read(str(reference), dtype="float32")
    return tts.engine.prepare_conditionals(wav[:int(seconds * sr)], 0.0, sr)


def load_ours(ckpt: Path, model: str, reference: Path):
    from chatterbox.tts_turbo import ChatterboxTurboTTS

    t0 = time.perf_counter()
    tts = ChatterboxTurboTTS.from_local(ckpt, "cpu", nano=model == "nano")
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    tts.prepare_conditionals(str(reference), exaggeration=0.0, norm_loudness=True)
    return tts, {"load_s": load_s, "prepare_conditionals_s": time.perf_counter() - t0}


def ours_generate(tts, case: TextCase, seed: int) -> dict:
    syn = stages.run_synthesize(tts, case, seed, watermark=False)
    st = syn.stages
    return {"total_s": syn.total_s, "audio_s": syn.audio_s, "t3_tokens": syn.generated, "t3_s": st.get("t3"),
            "flow_s": st.get("flow"), "hift_s": st.get("hift"), "rtf": syn.total_s / syn.audio_s}


def ours_stream(tts, case: TextCase, seed: int, schedule, context_window: int) -> dict:
    run = stages.run_stream(tts, case, seed, schedule, context_window, watermark=False)
    chunks = run.metrics.get("chunks", [])
    return {"total_s": run.total_s, "audio_s": run.audio_s, "ttfa_s": run.ttfa_s, "chunks": run.chunks,
            "rtf": run.total_s / run.audio_s, "t3_tokens": sum(int(c.get("tokens", 0)) for c in chunks),
            "t3_s": sum(c.get("t3_s", 0.0) for c in chunks), "flow_s": sum(c.get("flow_s", 0.0) for c in chunks),
            "vocoder_s": sum(c.get("vocoder_s", 0.0) for c in chunks),
            "per_chunk": [{k: c.get(k) for k in ("tokens", "samples", "t3_s", "flow_s", "vocoder_s")} for c in chunks]}


# ---------------------------------------------------------------------------------------- run
def t3_fidelity(tts, opts, case: TextCase, seed: int) -> dict:
    """Each quantised config's T3 against float32 T3, teacher-forced on float32's own tokens."""
    from chatterbox.optim.config import OptConfig

    quantised = [(spec, opt) for spec, opt in opts if opt.t3.quantize is not None]
    if not quantised:
        return {}
    ref_t3 = tts.with_opt(OptConfig.reference()).t3
    text, cond = tts.engine.text_tokens(case.text), tts.conds.t3
    temperature = SAMPLING["temperature"]
    with torch.inference_mode():
        speech = ref_t3.inference(cond, text, case.max_new_tokens, generator=torch.Generator().manual_seed(seed))
        start = torch.full((1, 1), ref_t3.cfg.start_speech_token, dtype=torch.long)
        fed = torch.cat([start, speech[:, :-1]], dim=1)  # position i is fed token i-1 and predicts token i
        ref = ref_t3(cond, text, fed).speech_logits[0]  # (N, V)
    out = {}
    for spec, opt in quantised:
        tts.set_opt(opt)
        with torch.inference_mode():
            got = tts.t3(cond, text, fed).speech_logits[0]
        rel = ((got - ref).norm(dim=-1) / ref.norm(dim=-1)).tolist()
        log_p, log_q = (ref / temperature).log_softmax(-1), (got / temperature).log_softmax(-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1).tolist()
        out[spec] = {"positions": len(rel), "rel_err_median": _median(rel), "rel_err_max": max(rel),
                     "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).float().mean()),
                     "kl_median": _median(kl), "kl_max": max(kl), "temperature": temperature}
        log.info("%s T3 fidelity vs float32: %s", spec, out[spec])
    return out


def run_model(model: str, args, ckpt: Path, reference: Path, case: TextCase) -> dict:
    from chatterbox.optim.config import OptConfig

    tts, loaded = load_ours(ckpt, model, reference)
    opts = [(spec, OptConfig.parse(spec)) for spec in args.opts]
    fidelity = t3_fidelity(tts, opts, case, args.seed)
    short = short_voice(tts, reference, args.short_voice) if args.short_voice else None
    upstream, up_info = None, {"status": "skipped", "reason": "--no-upstream"}
    if args.upstream_python:
        try:
            upstream = UpstreamTurbo(args.upstream_python, ckpt, model, reference, args.threads)
            up_info = upstream.ready
        except (OSError, RuntimeError) as exc:
            log.warning("upstream skipped: %s", exc)
            up_info = {"status": "skipped", "reason": str(exc)}
    samples: list[dict] = []
    loads: list[list[float]] = []
    try:
        for rnd in range(args.warmup + args.reps):
            rep = rnd - args.warmup
            got = []
            for spec, opt in opts:
                tts.set_opt(opt)
                got.append({"variant": f"ours generate ({spec})", "side": "ours", "mode": "generate", "opt": spec,
                            **ours_generate(tts, case, args.seed)})
                for schedule in args.schedules:
                    got.append({"variant": f"ours stream {_sched(schedule)} ({spec})", "side": "ours",
                                "mode": "stream", "opt": spec, "chunk_size": schedule,
                                **ours_stream(tts, case, args.seed, schedule, args.context_window)})
                if short is not None and spec == opts[0][0]:
                    voice, tts.conds = tts.conds, short
                    try:
                        got.append({"variant": f"ours stream {_sched(args.schedules[0])} ({spec}, "
                                               f"{args.short_voice:g} s voice)", "side": "ours", "mode": "stream",
                                    "opt": spec, "chunk_size": args.schedules[0], "voice_seconds": args.short_voice,
                                    **ours_stream(tts, case, args.seed, args.schedules[0], args.context_window)})
                    finally:
                        tts.conds = voice
            if upstream is not None:
                out = upstream.generate(case.text, case.max_new_tokens, args.seed)
                got.append({"variant": "upstream generate", "side": "upstream", "mode": "generate",
                            "rtf": out["total_s"] / out["audio_s"], **out})
            loads.append(list(os.getloadavg()))
            for g in got:
                log.info("%s %s rep %d: RTF %.3f%s", model, g["variant"], rep, g["rtf"],
                         f", first audio {g['ttfa_s']:.2f} s" if "ttfa_s" in g else "")
            if rep >= 0:
                samples += [{"model": model, "rep": rep, **g} for g in got]
    finally:
        if upstream is not None:
            upstream.close()
    return {"model": model, "ours": loaded, "upstream": up_info, "samples": samples, "loadavg_per_round": loads,
            "summary": summarize(samples), "t3_fidelity": fidelity}


def _sched(schedule) -> str:
    return ",".join(map(str, schedule)) if isinstance(schedule, (list, tuple)) else str(schedule)


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


def summarize(samples: list[dict]) -> dict:
    out = {}
    for variant in dict.fromkeys(s["variant"] for s in samples):
        rows = [s for s in samples if s["variant"] == variant]
        entry = {"reps": len(rows)}
        for key in ("rtf", "total_s", "audio_s", "ttfa_s", "t3_s", "flow_s", "hift_s", "vocoder_s", "s3gen_s",
                    "t3_tokens", "chunks"):
            med = _median([r.get(key) for r in rows])
            if med is not None:
                entry[key] = med
        tokens = [r["t3_s"] / r["t3_tokens"] for r in rows if r.get("t3_s") and r.get("t3_tokens")]
        if tokens:
            entry["t3_ms_per_token"] = 1000 * float(np.median(tokens))
        if rows[0]["mode"] == "stream":
            flows = [c["flow_s"] for r in rows for c in r["per_chunk"] if c.get("flow_s") is not None]
            vocs = [c["vocoder_s"] for r in rows for c in r["per_chunk"] if c.get("vocoder_s") is not None]
            entry["flow_s_per_chunk"] = _median(flows)
            entry["vocoder_s_per_chunk"] = _median(vocs)
        out[variant] = entry
    return out


# ---------------------------------------------------------------------------------------- report
def markdown(result: dict) -> str:
    env, mach, st = result["env"], result["machine"], result["settings"]
    during = max((max(x) for m in result["runs"] for x in m["loadavg_per_round"]), default=0.0)
    lines = [f"# CPU: Chatterbox-{'/'.join(m.capitalize() for m in result['models'])}, ours vs upstream", "",
             f"{mach['cpu']}, {mach['cores']} cores, torch {env['torch']} ({mach['torch_threads']} threads), commit "
             f"{str(env.get('git_commit'))[:12]}. Load average before the run {_loads(mach['loadavg_before'])}; "
             f"during it at most {during:.2f} (this run's own two threads included).",
             f"Text {st['text']!r}, {st['max_new_tokens']} tokens ({st['max_new_tokens'] / 25:g} s of audio), seed "
             f"{st['seed']}, synthetic weights (salt {st['salt']}), voice from a 10 s reference, no watermark; "
             f"medians of {st['reps']} round(s) after {st['warmup']} warm-up.", ""]
    for run in result["runs"]:
        up = run["upstream"]
        lines += [f"## {run['model']}", "",
                  "| variant | RTF | first audio (s) | total (s) | audio (s) | T3 (s) | T3 ms/token | flow (s) | "
                  "vocoder (s) | flow s/chunk |", "|---|---|---|---|---|---|---|---|---|---|"]
        for name, s in run["summary"].items():
            flow = s.get("flow_s", s.get("s3gen_s"))
            vocoder = _f(s.get("hift_s", s.get("vocoder_s"))) if "s3gen_s" not in s else "(in flow)"
            lines.append(f"| {name} | {_f(s.get('rtf'))} | {_f(s.get('ttfa_s'))} | {_f(s.get('total_s'))} | "
                         f"{_f(s.get('audio_s'))} | {_f(s.get('t3_s'))} | {_f(s.get('t3_ms_per_token'), 1)} | "
                         f"{_f(flow)} | {vocoder} | {_f(s.get('flow_s_per_chunk'))} |")
        if up.get("status") != "ok":
            lines.append(f"\nupstream: {up.get('status')} ({up.get('reason')})")
        else:
            v = up["versions"]
            lines.append(f"\nupstream: chatterbox-tts {v['chatterbox-tts']}, torch {v['torch']}, transformers "
                         f"{v['transformers']}; its S3Gen (flow and vocoder) is timed as one (flow column). Stream "
                         "stage times are sums over chunks; first audio is the first `next()` of the stream.")
        lines.append("")
        if run.get("t3_fidelity"):
            lines += [f"T3 against float32 T3, teacher-forced on float32's {st['max_new_tokens']} tokens (seed "
                      f"{st['seed']}): relative error of the speech logits per position, top-1 agreement, KL "
                      "divergence of the sampling distribution (float32's from this one's).", "",
                      "| opt | rel. error median | rel. error max | top-1 agreement | KL median | KL max |",
                      "|---|---|---|---|---|---|"]
            for spec, f in run["t3_fidelity"].items():
                lines.append(f"| {spec} | {f['rel_err_median']:.4f} | {f['rel_err_max']:.4f} | "
                             f"{f['top1_agreement']:.3f} | {f['kl_median']:.4f} | {f['kl_max']:.4f} |")
            lines.append("")
    lines += ["## Verdict", ""] + [f"- {v}" for v in result["verdict"]] + [""]
    return "\n".join(lines)


def _loads(values) -> str:
    return " / ".join(f"{v:.2f}" for v in values)


def _f(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def verdict(result: dict) -> list[str]:
    out = []
    for run in result["runs"]:
        summary = run["summary"]
        up = summary.get("upstream generate")
        for name, s in summary.items():
            if not name.startswith("ours stream"):
                continue
            line = (f"{run['model']}: {name}: RTF {s['rtf']:.2f} "
                    f"({'meets' if s['rtf'] <= RTF_TARGET else 'misses'} the <= {RTF_TARGET:g} target), "
                    f"first audio {s['ttfa_s']:.2f} s")
            if up:
                line += f"; upstream generate RTF {up['rtf']:.2f} (no first audio before the whole utterance)"
            share = {k: s.get(k, 0.0) / s["total_s"] for k in ("t3_s", "flow_s", "vocoder_s")}
            line += (f"; time: T3 {share['t3_s']:.0%} ({s.get('t3_ms_per_token', float('nan')):.0f} ms/token), "
                     f"flow {share['flow_s']:.0%} ({s['flow_s_per_chunk']:.2f} s per chunk), "
                     f"vocoder {share['vocoder_s']:.0%}")
            out.append(line)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m eval.cpu_turbo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="nano", help="comma-separated: nano, turbo (default nano)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--salt", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=100, help="token budget of every call (25 = 1 s)")
    ap.add_argument("--text-set", default="short", help="eval/texts.py text set (one segment)")
    ap.add_argument("--opts", default="cpu,reference", help="comma-separated OptConfig specs of ours")
    ap.add_argument("--schedules", default="25", help="chunk schedules of ours' streams, ';'-separated (25;25,50,100)")
    ap.add_argument("--context-window", type=int, default=50)
    ap.add_argument("--short-voice", type=float, default=6.0,
                    help="also stream (first opt, first schedule) with a voice from this many seconds of the "
                         "reference, to show how S3Gen's cost per chunk follows the voice prompt (0: skip)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads on both sides")
    ap.add_argument("--ckpt", type=Path, default=None, help="synthetic Turbo + Nano checkpoint directory")
    ap.add_argument("--upstream-python", default=DEFAULT_PYTHON,
                    help="interpreter (or virtual environment) of upstream's side environment ('' to skip upstream)")
    ap.add_argument("--commit", default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "eval" / "results" / "cpu-nano")
    args = ap.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not args.models or any(m not in ("nano", "turbo") for m in args.models):
        ap.error(f"--models takes nano and/or turbo, got {args.models}")
    args.opts = [o.strip() for o in args.opts.split(",") if o.strip()]
    args.schedules = [_schedule(s) for s in args.schedules.split(";") if s.strip()]
    if args.upstream_python and upstream_python(args.upstream_python) is None:
        log.warning("no upstream interpreter at %s: upstream skipped", args.upstream_python)
    args.upstream_python = upstream_python(args.upstream_python) or ""
    args.out = args.out.with_suffix("") if args.out.suffix == ".json" else args.out
    return args


def _schedule(text: str):
    sizes = [int(x) for x in text.split(",") if x.strip()]
    return sizes[0] if len(sizes) == 1 else sizes


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from .ab import environment

    mach = machine()
    base = TEXT_SETS[args.text_set]
    case = TextCase(base.name, base.text, args.max_new_tokens)
    ckpt = args.ckpt or checkpoint_dir(args.salt)
    runs = []
    with tempfile.TemporaryDirectory(prefix="cpu_turbo_") as tmp:
        reference = write_reference(Path(tmp) / "reference.wav", *reference_audio(None))
        for model in args.models:
            runs.append(run_model(model, args, ckpt, reference, case))
    mach["loadavg_after"] = list(os.getloadavg())
    result = {"schema": SCHEMA, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["python -m eval.cpu_turbo", *(argv if argv is not None else sys.argv[1:])]),
              "env": environment(torch.device("cpu"), args.commit), "machine": mach, "models": args.models,
              "settings": {"text": case.text, "max_new_tokens": case.max_new_tokens, "seed": args.seed,
                           "salt": args.salt, "reps": args.reps, "warmup": args.warmup, "opts": args.opts,
                           "schedules": args.schedules, "context_window": args.context_window,
                           "sampling": SAMPLING, "watermark": False, "reference_seconds": 10.0},
              "runs": runs}
    result["verdict"] = verdict(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report.jsonable(result), indent=1, allow_nan=False) + "\n")
    md = markdown(result)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
