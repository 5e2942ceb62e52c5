"""A/B evaluation of optimisation configurations, in one process on one loaded model.

    python -m eval.ab --device cuda --configs reference,fast,reference+t3.dtype=bfloat16 \\
        [--text-set short,long] [--reps N] [--out eval/results/NAME] [--ckpt DIR] [--upstream PATH]
    python -m eval.ab --quick          # CPU smoke run: tiny token budget, one rep
    python -m eval.ab --model turbo --device cuda --configs reference,fast --upstream /tmp/upvenv

``--model`` picks the family (original, turbo, nano); the JSON's ``model`` field records it.
``--upstream`` is an upstream chatterbox(-streaming) checkout for the original model; for Turbo and
Nano it is the side environment with PyPI ``chatterbox-tts==0.1.7`` (a virtual environment or its
interpreter, ``docs/turbo_parity.md``): both sides then load the same synthetic checkpoint directory
and voice, and upstream's ``generate`` (no streaming API there) is timed per text set and round.

Phases: (1) fidelity, once per configuration, reference first: ``synthesize`` under the fixed
seed (its tokens against the reference's; the raw ids, invalid ones included, from the engine's T3
runner run alone with the same seed) and the reference's tokens rendered through this
configuration's engine (its S3Gen modules and graph wrappers, the ones ``synthesize`` runs; same CFM
and source noise); (2) ``--warmup`` untimed rounds; (3) ``--reps`` timed rounds, configurations
interleaved (A B A B ...), each: set_opt (a new engine for the configuration; then, for one with
CUDA graphs or compiled code, one untimed pass over the text sets, because a new engine captures its
graphs and compiles on first use: the figures are the steady state), synthesize and stream every
text set, time prepare_conditionals on a 10 s reference, record peak GPU memory. A configuration
that fails is dropped with its reason; reference cannot fail. Every round uses the same seed.
Only public APIs are used (``ChatterboxTTS``, its ``engine``, the engine's ``t3_runner``).
Output: NAME.json, NAME.md, NAME-latency.png, NAME-stages.png (see patches/README.md).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import logging
import math
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import report, stages
from .texts import QUICK_MAX_NEW_TOKENS, QUICK_VOICE_SECONDS, TEXT_SETS, TextCase, reference_audio, text_cases

log = logging.getLogger("eval.ab")

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = "chatterbox-fast/ab/1"
FAMILIES = ("original", "turbo", "nano")
QUICK_CONFIGS = "reference,reference+autograd_mode=no_grad"
QUICK_CHUNK_SIZE = 4


# ---------------------------------------------------------------------------------------- configs
def resolve_config(spec: str):
    """An ``OptConfig`` from a spec ("reference", "fast", "reference+t3.dtype=bfloat16", ...)."""
    from chatterbox.optim import OptConfig

    return OptConfig.parse(spec)


def resolve_configs(specs: list[str]) -> tuple[list[tuple[str, object]], list[dict]]:
    """[(name, OptConfig)] with reference first (added when absent), and the skipped ones."""
    specs = [report.REFERENCE] + [s for s in dict.fromkeys(specs) if s != report.REFERENCE]
    ok, skipped = [], []
    for spec in specs:
        try:
            ok.append((spec, resolve_config(spec)))
        except (ValueError, TypeError, AttributeError) as exc:
            log.warning("config %s skipped: %s", spec, exc)
            skipped.append({"name": spec, "reason": str(exc)})
    return ok, skipped


def opt_dict(cfg) -> dict:
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else {"repr": repr(cfg)}


# ---------------------------------------------------------------------------------------- environment
def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device, commit: str | None = None) -> dict:
    head = _git("rev-parse", "HEAD")
    # An explicit --commit wins: a copied tree may carry a stale .git of its own.
    in_git = commit is None and bool(head) and re.fullmatch(r"[0-9a-f]{40}", head) is not None
    env = {"device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda,
           "python": platform.python_version(), "platform": platform.platform(),
           "cpu_threads": torch.get_num_threads(), "git_commit": head if in_git else commit,
           "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")) if in_git else None,
           "device_name": platform.processor() or platform.machine(), "driver": None}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        props = torch.cuda.get_device_properties(device)
        env["device_memory_gb"] = props.total_memory / stages.GB
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
            env["driver"] = out[device.index or 0] if out else None
        except (OSError, subprocess.SubprocessError):
            pass
    return env


# ---------------------------------------------------------------------------------------- phases
def fidelity_phase(tts, configs, cases: list[TextCase], args) -> tuple[dict, dict, list[dict]]:
    """Per config and text, through the pipeline under the fixed seed: its tokens against the
    reference's, and the reference's tokens rendered by its engine's S3Gen. Returns (fidelity
    figures for the JSON, per config/text the tokens T3 generated, failed configs)."""
    fid: dict = {}
    tokens: dict = {}
    ref: dict = {}
    failed: list[dict] = []
    for name, cfg in configs:
        try:
            switch_config(tts, cfg)
            fid[name], tokens[name] = _fidelity_of(tts, name, cases, args, ref)
        except Exception as exc:  # noqa: BLE001 - reported and skipped, see run_matrix
            if name == report.REFERENCE:
                raise
            log.warning("config %s dropped: %s", name, exc)
            failed.append({"name": name, "reason": f"{type(exc).__name__}: {exc}"})
    return fid, tokens, failed


def _fidelity_of(tts, name: str, cases: list[TextCase], args, ref: dict) -> tuple[dict, dict]:
    fid, tokens = {}, {}
    for case in cases:
        syn = stages.run_synthesize(tts, case, args.seed, watermark=False)
        raw = stages.pipeline_t3_tokens(tts, case, args.seed, syn)
        count = syn.generated
        tokens[case.name] = count
        # the count is the pipeline's own (SynthesisResult.generated_tokens): always exact
        entry = {"t3_tokens": count, "t3_tokens_exact": True, "valid_tokens": syn.valid_tokens.numel(),
                 "tokens": (raw if raw is not None else syn.valid_tokens).tolist()}
        if name == report.REFERENCE:
            ref[case.name] = {"valid": syn.valid_tokens, "raw": raw, "wav": syn.wav}
        ref_case = ref[case.name]
        # over all generated ids when both are known, else over the rendered ones
        both = raw is not None and ref_case["raw"] is not None
        entry["token_agreement"] = (stages.token_agreement(ref_case["raw"], raw) if both
                                    else stages.token_agreement(ref_case["valid"], syn.valid_tokens))
        entry["e2e_wav_snr_db"] = stages.snr_db(ref_case["wav"], syn.wav)
        if ref_case["valid"].numel():
            mel, wav = stages.render(tts, ref_case["valid"], args.seed)
            if name == report.REFERENCE:
                ref_case.update(mel=mel, rwav=wav)
            entry["mel_snr_db"] = stages.snr_db(ref_case["mel"], mel)
            entry["wav_snr_db"] = stages.snr_db(ref_case["rwav"], wav)
            entry["spec_snr_db"] = stages.spectral_snr_db(ref_case["rwav"], wav)
        else:
            entry["note"] = "reference produced no renderable tokens"
        fid[case.name] = entry
        log.info("fidelity %s/%s: %d tokens, agreement %.3f, wav SNR %s dB", name, case.name, count,
                 entry["token_agreement"], entry.get("wav_snr_db"))
    return fid, tokens


def switch_config(tts, cfg) -> float:
    """``set_opt(cfg)`` (a new engine from the float32 weights); the previous engine is collected
    before the next measurement, so only one configuration's engine is resident. -> seconds."""
    t0 = time.perf_counter()
    tts.set_opt(cfg)
    seconds = time.perf_counter() - t0
    gc.collect()
    if tts.device.type == "cuda":
        torch.cuda.empty_cache()
    return seconds


def measure(tts, name: str, cfg, cases: list[TextCase], rep: int, args, ref_audio) -> list[dict]:
    """One round of one configuration; returns its samples."""
    dev = tts.device
    out = [{"kind": "set_opt", "config": name, "rep": rep, "seconds": switch_config(tts, cfg)}]
    if needs_rewarm(cfg):
        # the new engine captures this config's graphs (and compiles its code) on first use;
        # that is a start-up cost, not part of the steady state a server runs in.
        t0 = time.perf_counter()
        for case in cases:
            stages.run_synthesize(tts, case, args.seed, args.watermark)
            if stages.stream_supported(tts) is None:
                stages.run_stream(tts, case, args.seed, args.chunk_size, args.context_window, args.watermark)
        stages.prepare_conditionals_seconds(tts, *ref_audio)  # per-voice graphs, too
        out.append({"kind": "rewarm", "config": name, "rep": rep, "seconds": time.perf_counter() - t0})
    stages.reset_peak_memory(dev)
    stream_why = stages.stream_supported(tts)
    for case in cases:
        syn = stages.run_synthesize(tts, case, args.seed, args.watermark)
        sample = {"kind": "synth", "config": name, "rep": rep, "text": case.name, "total_s": syn.total_s,
                  "audio_s": syn.audio_s, "stages": syn.stages, "t3_tokens": syn.generated, "t3_tokens_exact": True,
                  "t3_prefill_s": stages.t3_prefill_seconds(tts, case, args.seed),
                  "flow_encoder_s": (stages.flow_encoder_seconds(tts, syn.valid_tokens)
                                     if syn.valid_tokens.numel() else math.nan)}
        out.append(sample)
        if stream_why is None:
            st = stages.run_stream(tts, case, args.seed, args.chunk_size, args.context_window, args.watermark)
            out.append({"kind": "stream", "config": name, "rep": rep, "text": case.name, "ttfa_s": st.ttfa_s,
                        "total_s": st.total_s, "audio_s": st.audio_s, "chunks": st.chunks, "metrics": st.metrics})
    out.append({"kind": "conds", "config": name, "rep": rep,
                "prepare_conditionals_s": stages.prepare_conditionals_seconds(tts, *ref_audio)})
    out.append({"kind": "memory", "config": name, "rep": rep, "peak_mem_gb": stages.peak_memory_gb(dev)})
    return out


def needs_rewarm(cfg) -> bool:
    """Whether switching to ``cfg`` leaves graphs to capture or code to compile on its first call."""
    from chatterbox.optim.config import COMPONENTS

    return any(cfg.component(c).cuda_graphs or cfg.component(c).compile is not None for c in COMPONENTS)


def run_matrix(tts, configs, cases: list[TextCase], args, ref_audio) -> tuple[list[dict], dict, list[dict]]:
    """All phases; returns (samples, fidelity, configs dropped because set_opt or a run failed).

    A configuration that raises is dropped (with the reason) and the others go on; reference cannot
    be dropped, its failure ends the run.
    """
    fidelity, tokens, failed = fidelity_phase(tts, configs, cases, args)
    live = [(n, c) for n, c in configs if n in tokens]
    samples: list[dict] = []
    rounds = [(-1, "warm-up")] * args.warmup + [(rep, "round") for rep in range(args.reps)]
    for rep, phase in rounds:
        for name, cfg in list(live):
            try:
                got = measure(tts, name, cfg, cases, rep, args, ref_audio)
            except Exception as exc:  # noqa: BLE001 - one broken configuration must not end the matrix
                if name == report.REFERENCE:
                    raise
                log.warning("config %s dropped: %s failed: %s", name, phase, exc)
                failed.append({"name": name, "reason": f"{phase} failed: {type(exc).__name__}: {exc}"})
                live.remove((name, cfg))
                samples = [s for s in samples if s["config"] != name]
                continue
            if rep >= 0:
                samples += got
        if rep >= 0:
            log.info("round %d/%d done", rep + 1, args.reps)
    switch_config(tts, configs[0][1])
    return samples, fidelity, failed


# ---------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m eval.ab", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available; cpu with --quick)")
    ap.add_argument("--model", default="original", choices=FAMILIES, help="model family (default original)")
    ap.add_argument("--configs", default=None, help="comma-separated OptConfig specs (reference is always run)")
    ap.add_argument("--text-set", default=None, help=f"comma-separated text sets: {', '.join(TEXT_SETS)}")
    ap.add_argument("--reps", type=int, default=None, help="timed rounds (default 5; 1 with --quick)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed rounds per config (default 1; 0 with --quick)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="override every text set's token bound")
    ap.add_argument("--chunk-size", default="25", help="streaming chunk size: N or a schedule N,N,... (default 25)")
    ap.add_argument("--context-window", type=int, default=50)
    ap.add_argument("--watermark", action=argparse.BooleanOptionalAction, default=None,
                    help="apply the Perth watermark (default: when resemble-perth is installed)")
    ap.add_argument("--ckpt", type=Path, default=None, help="checkpoint directory (default: synthetic weights)")
    ap.add_argument("--salt", type=int, default=0, help="synthetic-weights salt")
    ap.add_argument("--ref-wav", type=Path, default=None, help="prepare_conditionals input (default: synthetic)")
    ap.add_argument("--out", type=Path, default=None, help="output stem (default eval/results/ab-DEVICE-TIME)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--quick", action="store_true", help="CPU smoke run (CI)")
    ap.add_argument("--upstream", type=Path, default=None,
                    help="upstream chatterbox-streaming checkout; for turbo/nano, the side environment with "
                         "chatterbox-tts==0.1.7 (its directory or interpreter)")
    ap.add_argument("--upstream-ckpt", type=Path, default=None, help="dir with ve.pt/t3_cfg.pt/s3gen.pt for upstream")
    ap.add_argument("--upstream-python", default=None, help="interpreter with upstream's packages")
    ap.add_argument("--upstream-pythonpath", default=None,
                    help="import path prepended for upstream (where its pinned packages are)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--commit", default=None, help="commit to record when the tree has no .git (a copied checkout)")
    args = ap.parse_args(argv)
    q = args.quick
    args.device = args.device or ("cpu" if q or not torch.cuda.is_available() else "cuda")
    args.configs = _csv(args.configs or (QUICK_CONFIGS if q else "reference,fast"))
    args.text_set = _csv(args.text_set or ("short" if q else "short,long"))
    args.reps = args.reps if args.reps is not None else (1 if q else 5)
    args.warmup = args.warmup if args.warmup is not None else (0 if q else 1)
    args.max_new_tokens = args.max_new_tokens or (QUICK_MAX_NEW_TOKENS if q else None)
    if q and args.chunk_size == "25":
        args.chunk_size = str(QUICK_CHUNK_SIZE)
    sizes = [int(x) for x in args.chunk_size.split(",")]
    args.chunk_size = sizes[0] if len(sizes) == 1 else sizes
    if args.reps < 1 or args.warmup < 0:
        ap.error("--reps must be >= 1 and --warmup >= 0")
    return args


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def load_tts(args, device: torch.device):
    from chatterbox import family

    t0 = time.perf_counter()
    tts = family.load(args.model, device, ckpt=args.ckpt, salt=args.salt)
    if args.ckpt is not None:
        ck = {"kind": "local", "path": str(args.ckpt.resolve()),
              "synthetic": (args.ckpt / "SYNTHETIC.txt").is_file()}
    else:
        ck = {"kind": "synthetic", "salt": args.salt, "synthetic": True}
    ck["model"] = args.model
    if tts.conds is None:
        wav, sr = reference_audio(args.ref_wav)
        tts.prepare_conditionals(wav, sample_rate=sr)
        ck["voice"] = "prepared from the reference audio (no conds.pt)"
    ck["load_s"] = time.perf_counter() - t0
    return tts, ck


def out_stem(args, device: torch.device) -> Path:
    if args.out is not None:
        return args.out.with_suffix("") if args.out.suffix == ".json" else args.out
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return ROOT / "eval" / "results" / f"ab-{'quick-' if args.quick else ''}{device.type}-{stamp}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    from chatterbox.watermark import watermark_available

    if args.watermark is None:
        args.watermark = watermark_available()
    device = torch.device(args.device)
    cases = text_cases(args.text_set, args.max_new_tokens)
    configs, skipped = resolve_configs(args.configs)
    turbo_upstream = args.upstream is not None and args.model != "original"
    if turbo_upstream and args.ckpt is None:
        from .upstream_turbo import checkpoint_dir

        args.ckpt = checkpoint_dir(args.salt)  # upstream reads files: both sides load these
    tts, checkpoint = load_tts(args, device)
    # the audio our voice was made from (None: the checkpoint's built-in voice), for upstream's voice
    voice_audio = reference_audio(args.ref_wav) if "voice" in checkpoint else None
    if args.quick:
        seconds = quick_voice_seconds(args.model)
        voice_audio = reference_audio(None, seconds=seconds)
        tts.prepare_conditionals(voice_audio[0], sample_rate=voice_audio[1])
        checkpoint["voice"] = f"quick: made from {seconds:g} s of the synthetic reference"
    for case in cases:
        stages.single_segment(tts, case)
    ref_audio = reference_audio(args.ref_wav)
    notes = []
    why = stages.stream_supported(tts)
    if why:
        notes.append(f"streaming figures skipped: {why}")
    samples, fidelity, failed = run_matrix(tts, configs, cases, args, ref_audio)
    names = [n for n, _ in configs if n not in {f["name"] for f in failed}]
    result = {
        "schema": SCHEMA,
        "model": args.model,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m eval.ab", *(argv if argv is not None else sys.argv[1:])]),
        "env": environment(device, args.commit),
        "checkpoint": checkpoint,
        "settings": {"reps": args.reps, "warmup": args.warmup, "seed": args.seed, "quick": args.quick,
                     "chunk_size": args.chunk_size, "context_window": args.context_window,
                     "watermark": args.watermark, "reference_seconds": len(ref_audio[0]) / ref_audio[1],
                     "reference_audio": str(args.ref_wav) if args.ref_wav else "synthetic",
                     "text_sets": {c.name: {"text": c.text, "max_new_tokens": c.max_new_tokens} for c in cases}},
        "configs": [{"name": n, "opt": opt_dict(c)} for n, c in configs if n in names],
        "skipped_configs": skipped + failed,
        "samples": samples,
        "fidelity": fidelity,
        "notes": notes,
    }
    if checkpoint.get("synthetic"):
        notes.append("synthetic weights: the output is not speech; every generation runs to max_new_tokens "
                      "unless the stop token is sampled, and ids >= 6561 are generated but not rendered")
    if turbo_upstream:
        result["upstream"] = turbo_upstream_block(args, cases, voice_audio, result)
    elif args.upstream is not None:
        result["upstream"] = upstream_block(args, cases, ref_audio, result)
    result["summary"] = report.summarize(result)
    write_outputs(result, out_stem(args, device), plots=not args.no_plots)
    return 0


def upstream_block(args, cases, ref_audio, result: dict) -> dict:
    from .upstream import probe_upstream, run_upstream, synthetic_pt_dir

    probe = probe_upstream(args.upstream, python=args.upstream_python, extra_path=args.upstream_pythonpath,
                           watermark=args.watermark)
    if probe.get("status") != "ok":
        log.info("upstream: %s %s", probe.get("status"), probe.get("reason", ""))
        return dict(probe, path=str(args.upstream))
    ckpt = args.upstream_ckpt or args.ckpt
    if ckpt is None:
        ckpt, why = synthetic_pt_dir(args.salt)
        if ckpt is None:
            return {"status": "skipped", "reason": why}
    up = run_upstream(args.upstream, ckpt, args.device, cases, seed=args.seed, reps=args.reps, warmup=args.warmup,
                      chunk_size=args.chunk_size, context_window=args.context_window, reference_wav=ref_audio[0],
                      reference_sr=ref_audio[1], watermark=args.watermark,
                      synthetic=bool(result["checkpoint"].get("synthetic")), python=args.upstream_python,
                      extra_path=args.upstream_pythonpath)
    up["path"] = str(args.upstream)
    if up.get("status") == "ok":
        result["samples"] += up.pop("samples")
        result["configs"].append({"name": report.UPSTREAM, "opt": None, "upstream": str(args.upstream)})
    log.info("upstream: %s %s", up.get("status"), up.get("reason", ""))
    return up


def quick_voice_seconds(model: str) -> float:
    """--quick's voice length: short, but past Turbo's and Nano's 5 s minimum."""
    from chatterbox.family import min_reference_seconds

    shortest = min_reference_seconds(model)
    return QUICK_VOICE_SECONDS if shortest is None else max(QUICK_VOICE_SECONDS, shortest + 1.0)


def turbo_upstream_block(args, cases, voice_audio, result: dict) -> dict:
    """Upstream Turbo/Nano (PyPI 0.1.7, ``eval/upstream_turbo.py``) on the same checkpoint directory,
    voice (made from ``voice_audio`` (samples, rate) by its own front end, or the directory's built-in
    ``conds.pt`` when None), texts, token budgets and seed: its ``generate`` once per text set per
    round (after the warm-up rounds), as ``synth`` samples of the ``upstream`` config (T3 and S3Gen
    stages)."""
    import tempfile

    from .upstream_turbo import UpstreamTurbo, upstream_python, write_reference

    python = upstream_python(args.upstream_python or args.upstream)
    if python is None:
        return {"status": "skipped", "reason": f"no interpreter at {args.upstream} (or {args.upstream}/bin/python)"}
    samples = []
    with tempfile.TemporaryDirectory(prefix="ab_upstream_") as tmp:
        reference = None if voice_audio is None else write_reference(Path(tmp) / "reference.wav", *voice_audio)
        try:
            with UpstreamTurbo(python, args.ckpt, args.model, reference, args.threads, device=args.device) as up:
                info = dict(up.ready)
                for rep in [-1] * args.warmup + list(range(args.reps)):
                    for case in cases:
                        out = up.generate(case.text, case.max_new_tokens, args.seed)
                        if rep >= 0:
                            samples.append({"kind": "synth", "config": report.UPSTREAM, "rep": rep, "text": case.name,
                                            "total_s": out["total_s"], "audio_s": out["audio_s"],
                                            "t3_tokens": out["t3_tokens"], "t3_tokens_exact": True,
                                            "stages": {"t3": out["t3_s"], "s3gen": out["s3gen_s"]}})
        except RuntimeError as exc:
            log.warning("upstream: %s", exc)
            return {"status": "failed", "reason": str(exc)}
    result["samples"] += samples
    result["configs"].append({"name": report.UPSTREAM, "opt": None, "upstream": f"chatterbox-tts "
                              f"{info['versions']['chatterbox-tts']} ({python})"})
    info["path"] = str(args.upstream)
    info["note"] = ("upstream runs its generate steps with T3.inference_turbo's max_gen_len as the token budget, "
                    "without the watermark; Turbo and Nano have no streaming API upstream")
    return info


def write_outputs(result: dict, stem: Path, plots: bool = True) -> dict[str, Path]:
    """NAME.json first (the record), then NAME.md and the plots."""
    import json

    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = {"json": stem.with_name(stem.name + ".json"), "md": stem.with_name(stem.name + ".md")}
    if plots:
        try:
            pngs, note = report.write_plots(result, stem)
        except Exception as exc:  # a plotting problem must not cost the measurements
            pngs, note = [], f"plots failed: {type(exc).__name__}: {exc}"
        if note:
            result["notes"].append(note)
            log.warning(note)
        for p in pngs:
            paths[p.stem.rsplit("-", 1)[-1]] = p
    paths["json"].write_text(json.dumps(report.jsonable(result), indent=1, allow_nan=False) + "\n")
    md = report.markdown_report(result)
    paths["md"].write_text(md)
    print(md)
    print("wrote " + ", ".join(str(p.relative_to(ROOT) if p.is_relative_to(ROOT) else p) for p in paths.values()))
    return paths


if __name__ == "__main__":
    sys.exit(main())
