"""Streams per GPU: a load generator against the engine in-process (or a server over HTTP).

    python -m eval.serve_bench --device cuda --opt "fast+t3_batching=1+s3gen_scheduling=1" \\
        --streams 1,8,16,32,64,128,256 [--s3gen-batch 8] [--rate 4 --duration 60] --out eval/results/NAME
    python -m eval.serve_bench --http http://127.0.0.1:8000 --streams 1,32 --out eval/results/NAME-http
    python -m eval.serve_bench --quick        # CPU smoke: the tiny pipeline, 1 and 2 streams
    python -m eval.serve_bench --model turbo --device cuda --opt fast --streams 1,64,256   # Chatterbox-Turbo

Closed loop (``--streams``): N callers at once, each sending ``--requests`` requests one after another.
Open loop (``--rate``): Poisson arrivals for ``--duration`` seconds. Every request is realistic for a
voice agent: a text from a mixed set, 5 to 20 s of audio (synthetic weights rarely stop, so the
length is set through ``max_new_tokens``, 25 tokens a second), the prepared voice. Each caller plays
its chunks back in real time (``playback.Playback``) and counts underruns. Per N: time to first audio
p50/p95/p99, underruns (count, seconds), audio seconds produced per wall second, per-stream RTF
p50/p95, peak GPU memory; and the largest N with zero underruns and p95 TTFA <= ``--ttfa-budget``.
Output: NAME.json (+ .md, + .png with matplotlib).
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import threading
import time
from pathlib import Path

import numpy as np
import torch

from .playback import Playback

log = logging.getLogger("eval.serve_bench")
ROOT = Path(__file__).resolve().parents[1]
SCHEMA = "chatterbox-fast/serve-bench/1"
TOKENS_PER_SECOND = 25
TEXTS = [
    "Sure, I can help with that. Your order shipped this morning and should arrive on Thursday.",
    "Thanks for calling. Let me look up your account; this will only take a moment.",
    "The meeting is moved to three o'clock, and the room has changed to the one on the second floor.",
    "Here is a quick summary of the article: prices rose slightly, while demand stayed roughly flat.",
    "I did not catch that. Could you say the last four digits of the number again, please?",
]
AUDIO_SECONDS = (5.0, 20.0)
# --quick: the tiny models' position tables are short (Turbo's: 512 with a 251-position prompt).
QUICK_MAX_NEW_TOKENS = 100


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def make_requests(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": rng.choice(TEXTS), "seconds": rng.uniform(*AUDIO_SECONDS), "seed": rng.randrange(2 ** 31)}
            for _ in range(n)]


def run_inprocess(tts, req: dict, chunk_size, clock=time.perf_counter, max_new_tokens: int | None = None) -> dict:
    play = Playback(requested_at=clock())
    t0 = clock()
    tokens = max(1, round(req["seconds"] * TOKENS_PER_SECOND))
    stream = tts.generate_stream(req["text"], seed=req["seed"], chunk_size=chunk_size, print_metrics=False,
                                 max_new_tokens=min(tokens, max_new_tokens or tokens), watermark=False)
    for chunk, _ in stream:
        play.arrive(clock(), chunk.shape[1] / tts.sr)
    total = clock() - t0
    return _record(play, total)


def run_http(url: str, req: dict, api_key: str | None, clock=time.perf_counter, model: str = "chatterbox") -> dict:
    import httpx

    sr, bytes_per_sample = 24000, 2
    play = Playback(requested_at=clock())
    t0 = clock()
    body = {"model": model, "input": req["text"], "voice": "default", "response_format": "pcm",
            "seed": req["seed"], "max_new_tokens": max(1, round(req["seconds"] * TOKENS_PER_SECOND))}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=url, timeout=600) as client:
        with client.stream("POST", "/v1/audio/speech", json=body, headers=headers) as response:
            response.raise_for_status()
            for piece in response.iter_raw():
                play.arrive(clock(), len(piece) / (sr * bytes_per_sample))
    return _record(play, clock() - t0)


def _record(play: Playback, total_s: float) -> dict:
    return {"ttfa_s": play.ttfa_s, "total_s": total_s, "audio_s": play.audio_s, "underruns": play.underruns,
            "underrun_s": play.underrun_s, "rtf": total_s / play.audio_s if play.audio_s else None}


def warm(run_one, streams: int, seed: int) -> None:
    """Before anything is timed: the longest request alone, then ``streams`` of them at once, so the
    S3Gen graphs of every length bucket (and batched ones, when S3Gen batches) and the allocator's
    pools exist before the first measured level (T3's are captured at build)."""
    longest = [dict(r, seconds=AUDIO_SECONDS[1]) for r in make_requests(max(streams, 1), seed + 1)]
    run_one(longest[0])
    if streams > 1:
        threads = [threading.Thread(target=run_one, args=(r,), daemon=True) for r in longest]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def closed_loop(run_one, n: int, requests_per_stream: int, seed: int) -> tuple[list[dict], float]:
    reqs = make_requests(n * requests_per_stream, seed)
    results: list[dict] = []
    lock = threading.Lock()
    barrier = threading.Barrier(n)

    def caller(i: int) -> None:
        barrier.wait()
        for k in range(requests_per_stream):
            rec = run_one(reqs[i * requests_per_stream + k])
            with lock:
                results.append(rec)

    start = time.perf_counter()
    threads = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - start


def open_loop(run_one, rate: float, duration_s: float, seed: int) -> tuple[list[dict], float]:
    rng = random.Random(seed)
    reqs = make_requests(max(1, int(rate * duration_s * 2)), seed)
    results: list[dict] = []
    lock = threading.Lock()
    threads = []
    start = time.perf_counter()
    t = 0.0
    for req in reqs:
        t += rng.expovariate(rate)
        if t > duration_s:
            break
        time.sleep(max(0.0, start + t - time.perf_counter()))

        def caller(r=req):
            rec = run_one(r)
            with lock:
                results.append(rec)

        threads.append(threading.Thread(target=caller, daemon=True))
        threads[-1].start()
    for th in threads:
        th.join()
    return results, time.perf_counter() - start


def summarize(results: list[dict], wall_s: float, device: torch.device) -> dict:
    ttfa = [r["ttfa_s"] for r in results if r["ttfa_s"] is not None]
    rtf = [r["rtf"] for r in results if r["rtf"] is not None]
    out = {"requests": len(results), "ttfa_p50_s": pct(ttfa, 50), "ttfa_p95_s": pct(ttfa, 95),
           "ttfa_p99_s": pct(ttfa, 99), "underruns": sum(r["underruns"] for r in results),
           "underrun_s": sum(r["underrun_s"] for r in results),
           "streams_with_underruns": sum(1 for r in results if r["underruns"]),
           "audio_s_per_wall_s": sum(r["audio_s"] for r in results) / wall_s if wall_s else None,
           "rtf_p50": pct(rtf, 50), "rtf_p95": pct(rtf, 95), "wall_s": wall_s}
    if device.type == "cuda":
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return out


def engine_counters(tts) -> dict:
    """The engine's running totals (batcher and S3Gen scheduler, when on); ``stage_figures`` turns two
    snapshots into where a level's time went."""
    if tts is None:
        return {}
    out = {}
    batcher, scheduler = tts.engine.t3_batcher, tts.engine.s3gen_scheduler
    if batcher is not None:
        out.update(t3_steps=batcher.steps, t3_rows=batcher.rows, t3_busy_s=batcher.busy_s)
    if scheduler is not None:
        out.update(s3gen_chunks=scheduler.rendered, s3gen_batches=scheduler.batches, s3gen_busy_s=scheduler.busy_s)
    return out


def stage_figures(before: dict, after: dict, wall_s: float) -> dict:
    """Per level: T3 tokens per second and mean requests per decode step, S3Gen chunks per round, and
    the fraction of the wall time each engine thread was busy (near 1: that stage is the limit)."""
    d = {k: after[k] - before[k] for k in after if k in before}
    out = {}
    if "t3_steps" in d and wall_s > 0:
        out.update(t3_tokens_per_s=d["t3_rows"] / wall_s, t3_mean_batch=d["t3_rows"] / max(d["t3_steps"], 1),
                   t3_busy=d["t3_busy_s"] / wall_s)
    if "s3gen_chunks" in d and wall_s > 0:
        out.update(s3gen_chunks_per_s=d["s3gen_chunks"] / wall_s,
                   s3gen_mean_batch=d["s3gen_chunks"] / max(d["s3gen_batches"], 1), s3gen_busy=d["s3gen_busy_s"] / wall_s)
    return out


def capacity(rows: dict, ttfa_budget_s: float) -> int | None:
    """The largest N with zero underruns and p95 TTFA within the budget."""
    ok = [int(n) for n, r in rows.items() if r["underruns"] == 0 and r["ttfa_p95_s"] is not None
          and r["ttfa_p95_s"] <= ttfa_budget_s]
    return max(ok) if ok else None


def _stage(row: dict, rate: str, batch: str, busy: str) -> str:
    st = row.get("stages", {})
    if rate not in st:
        return "n/a"
    return f"{st[rate]:.0f} ({st[batch]:.1f}, {st[busy]:.0%})"


def write(result: dict, stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [f"# serve bench: {result.get('model', 'original')}, {result['mode']}, {result.get('opt')}", "",
             f"capacity (zero underruns, p95 TTFA <= {result['ttfa_budget_s'] * 1000:.0f} ms): "
             f"{result['capacity']}", "",
             "| streams | requests | TTFA p50 / p95 / p99 (ms) | underruns (s) | audio s / wall s | RTF p50 / p95 | "
             "peak GB | T3 tok/s (mean batch, busy) | S3Gen chunks/s (mean batch, busy) |",
             "|---|---|---|---|---|---|---|---|---|"]
    ms = lambda v: "n/a" if v is None else f"{v * 1000:.0f}"  # noqa: E731
    num = lambda v: "n/a" if v is None else f"{v:.3g}"  # noqa: E731
    for n, r in result["rows"].items():
        lines.append(f"| {n} | {r['requests']} | {ms(r['ttfa_p50_s'])} / {ms(r['ttfa_p95_s'])} / "
                     f"{ms(r['ttfa_p99_s'])} | {r['underruns']} ({r['underrun_s']:.2f}) | "
                     f"{num(r['audio_s_per_wall_s'])} | {num(r['rtf_p50'])} / {num(r['rtf_p95'])} | "
                     f"{num(r.get('peak_mem_gb'))} | {_stage(r, 't3_tokens_per_s', 't3_mean_batch', 't3_busy')} | "
                     f"{_stage(r, 's3gen_chunks_per_s', 's3gen_mean_batch', 's3gen_busy')} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib missing: no plot")
        return
    ns = [int(n) for n in result["rows"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(ns, [result["rows"][str(n)]["ttfa_p95_s"] * 1000 for n in ns], "o-", label="TTFA p95 (ms)")
    ax.plot(ns, [result["rows"][str(n)]["ttfa_p50_s"] * 1000 for n in ns], "o--", label="TTFA p50 (ms)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("ms")
    ax2 = ax.twinx()
    ax2.plot(ns, [result["rows"][str(n)]["audio_s_per_wall_s"] for n in ns], "s-", color="tab:green",
             label="audio s / wall s")
    ax2.set_ylabel("audio seconds per wall second")
    fig.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"))
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default="original", choices=("original", "turbo", "nano"),
                    help="model family (over --http: the server's model of that family)")
    ap.add_argument("--opt", default="fast")
    ap.add_argument("--s3gen-batch", type=int, default=1, help="EngineConfig.s3gen_batch")
    ap.add_argument("--streams", default="1,8,16,32,64,128,256")
    ap.add_argument("--requests", type=int, default=2, help="requests per stream in the closed loop")
    ap.add_argument("--rate", type=float, default=None, help="open loop: Poisson arrivals per second")
    ap.add_argument("--duration", type=float, default=60.0, help="open loop: seconds of arrivals")
    ap.add_argument("--chunk-size", default="25")
    ap.add_argument("--ttfa-budget", type=float, default=0.3, help="seconds")
    ap.add_argument("--http", default=None, help="drive a running server at this URL instead")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--commit", default=None)
    ap.add_argument("--quick", action="store_true", help="CPU smoke run on the tiny pipeline")
    ap.add_argument("--out", default=str(ROOT / "eval" / "results" / "serve-bench"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from .ab import environment

    chunk_size = [int(c) for c in args.chunk_size.split(",")]
    chunk_size = chunk_size[0] if len(chunk_size) == 1 else chunk_size
    device = torch.device("cpu" if args.quick else args.device)
    tts = None
    if args.http:
        from chatterbox.serve.config import ServerConfig

        name = ServerConfig.published().family_model_name(args.model)
        run_one = lambda req: run_http(args.http, req, args.api_key, model=name)  # noqa: E731
    else:
        tts = _load(args, device)
        cap = QUICK_MAX_NEW_TOKENS if args.quick else None
        run_one = lambda req: run_inprocess(tts, req, chunk_size, max_new_tokens=cap)  # noqa: E731
        warm(run_one, 1 if args.quick else args.s3gen_batch, args.seed)
    streams = [1, 2] if args.quick else [int(n) for n in args.streams.split(",")]
    rows = {}
    opt = "reference" if args.quick else args.opt
    result = {"schema": SCHEMA, "model": args.model, "mode": "http" if args.http else "in-process", "opt": opt,
              "s3gen_batch": args.s3gen_batch, "env": environment(device, args.commit), "chunk_size": chunk_size,
              "ttfa_budget_s": args.ttfa_budget, "rows": rows, "capacity": None}
    for n in streams:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        before = engine_counters(tts)
        results, wall = closed_loop(run_one, n, 1 if args.quick else args.requests, args.seed + n)
        rows[str(n)] = summarize(results, wall, device)
        stages = stage_figures(before, engine_counters(tts), wall)
        if stages:
            rows[str(n)]["stages"] = stages
        log.info("%d streams: %s", n, {k: round(v, 3) if isinstance(v, float) else v for k, v in rows[str(n)].items()})
        result["capacity"] = capacity(rows, args.ttfa_budget)
        write(result, Path(args.out))  # after every level: a run cut short keeps what it measured
    if args.rate:
        results, wall = open_loop(run_one, args.rate, args.duration, args.seed)
        result["open_loop"] = {"rate": args.rate, "duration_s": args.duration, **summarize(results, wall, device)}
    write(result, Path(args.out))
    log.info("capacity: %s streams", result["capacity"])
    return 0


def _load(args: argparse.Namespace, device: torch.device):
    from chatterbox import OptConfig, family
    from chatterbox.engine import EngineConfig

    opt = OptConfig.parse("reference" if args.quick else args.opt)
    cfg = EngineConfig(s3gen_batch=args.s3gen_batch)
    if args.quick:
        return _tiny(args.model, device, opt, cfg)
    tts = family.load(args.model, device, opt=opt)
    tts.engine_cfg = cfg
    tts.set_opt(opt)
    return tts


def _tiny(model: str, device: torch.device, opt, cfg):
    """The tiny pipeline of ``model``'s family (its audio means nothing; it checks the machinery)."""
    import tempfile

    from chatterbox.family import is_turbo
    from chatterbox.voice import synthetic_reference

    if is_turbo(model):
        from chatterbox.loader_turbo import build_tiny_turbo_models
        from chatterbox.tts_turbo import SYNTHETIC_REFERENCE_SECONDS, ChatterboxTurboTTS

        m = build_tiny_turbo_models()
        tts = ChatterboxTurboTTS(m.t3, m.s3gen, m.ve, m.tokenizer, device, opt=opt, engine_cfg=cfg)
        tts.prepare_conditionals(synthetic_reference(seconds=SYNTHETIC_REFERENCE_SECONDS), sample_rate=24000)
        return tts
    from chatterbox import ChatterboxTTS
    from chatterbox.loader import build_tiny_models
    from chatterbox.text import EnTokenizer
    from chatterbox.text_vocab import write_tokenizer_json

    models = build_tiny_models()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = EnTokenizer(write_tokenizer_json(Path(tmp) / "tokenizer.json"))
    tts = ChatterboxTTS(models.t3, models.s3gen, models.ve, tokenizer, device, opt=opt, engine_cfg=cfg)
    tts.prepare_conditionals(synthetic_reference(), sample_rate=24000)
    return tts


if __name__ == "__main__":
    raise SystemExit(main())
