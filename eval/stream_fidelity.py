"""Streaming fidelity and work: our incremental S3Gen against upstream's re-synthesis method.

    python -m eval.stream_fidelity [--device cpu] [--tokens 100] [--chunk 25] \\
        [--contexts 0,10,25,50,100] [--out eval/results/stream_fidelity_cpu]

Both methods render the same speech tokens with the same CFM noise table and zeroed vocoder noise,
so every difference from the one-shot rendering comes from the streaming scheme itself. Reported per
context window: mel SNR (ours only: upstream never forms a stream mel), waveform SNR and STFT
magnitude SNR against one-shot, the flow work per emitted token (tokens encoded, prompt included),
and wall time. Synthetic weights (salt 0): the numbers measure the schemes, not a trained voice.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from chatterbox.models.s3gen.hift_stream import HiFTStreamer, StreamNoise
from chatterbox.models.s3gen.s3gen import S3GenRef
from chatterbox.models.s3gen.source import SourceNoise
from chatterbox.streaming import FlowStreamConfig, flow_stream_step, init_flow_stream
from tools.parity.legacy_stream import legacy_stream_chunks
from tools.parity.runner import ParityContext, load_fixture
from tools.parity.s3gen_loader import load_s3gen

from .ab import environment
from .stages import snr_db, spectral_snr_db

log = logging.getLogger("eval.stream_fidelity")
ROOT = Path(__file__).resolve().parents[1]
SAMPLES_PER_FRAME = 480


class CountingS3Gen:
    """Stands in for an S3Gen where the streaming schemes take one: counts the tokens (prompt
    included) each ``flow_inference`` call encodes and passes every call and attribute on to the
    S3Gen it holds (which is left untouched)."""

    def __init__(self, s3gen) -> None:
        self.s3gen = s3gen
        self.tokens = 0
        self.calls = 0

    def __getattr__(self, name: str):
        return getattr(self.s3gen, name)

    def flow_inference(self, tokens, ref, *args, **kwargs):
        self.tokens += int(tokens.reshape(-1).shape[0]) + int(ref.prompt_token.shape[1])
        self.calls += 1
        return self.s3gen.flow_inference(tokens, ref, *args, **kwargs)


def ours(s3gen, ref, tokens, noise, chunk: int, context: int, lookahead: int):
    cfg = FlowStreamConfig(context_window=context, lookahead_tokens=lookahead)
    streamer = HiFTStreamer(s3gen.mel2wav)
    state = init_flow_stream(s3gen, ref)
    voc = streamer.init_state(1, s3gen.device, StreamNoise.zeros())
    mels, audio = [], []
    starts = list(range(0, tokens.shape[0], chunk))
    for i, start in enumerate(starts):
        final = i == len(starts) - 1
        mel, state = flow_stream_step(s3gen, ref, state, tokens[start:start + chunk], noise, cfg, final=final)
        wav, voc = streamer.push(mel, voc, final=final)
        mels.append(mel)
        audio.append(wav)
    return torch.cat(mels, dim=-1), s3gen.apply_trim_fade(torch.cat(audio, dim=-1))


def legacy(s3gen, ref, tokens, noise, chunk: int, context: int):
    pieces = [tokens[i:i + chunk] for i in range(0, tokens.shape[0], chunk)]
    zeros = lambda n: SourceNoise.zeros(1, n, device=s3gen.device)  # noqa: E731
    return torch.cat([c for c, _ in legacy_stream_chunks(s3gen, ref, pieces, context, 0.02, noise,
                                                         source_noise=zeros)], dim=-1)


def timed(device, fn):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--chunk", type=int, default=25)
    ap.add_argument("--lookahead", type=int, default=3)
    ap.add_argument("--contexts", default="0,10,25,50,100")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--commit", default=None, help="commit to record when the tree has no .git")
    ap.add_argument("--out", default=str(ROOT / "eval" / "results" / "stream_fidelity_cpu"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    ctx = ParityContext(device=str(device))
    s3gen = load_s3gen(ctx)
    fx = load_fixture(ROOT / "tests" / "fixtures" / "s3gen_e2e.safetensors")
    ref = S3GenRef(prompt_token=fx["ref_prompt_token"], prompt_token_len=fx["ref_prompt_token_len"],
                   prompt_feat=fx["ref_prompt_feat"], embedding=fx["ref_embedding"]).to(device)
    tokens = torch.randint(0, 6561, (args.tokens,), generator=torch.Generator().manual_seed(0)).to(device)
    noise = s3gen.draw_cfm_noise(torch.Generator().manual_seed(0))
    rows = []
    with torch.inference_mode():
        (mel_ref, wav_ref), t_one = timed(device, lambda: _one_shot(s3gen, ref, tokens, noise))
        mel_ref, wav_ref = mel_ref.cpu(), wav_ref.cpu()
        log.info("one-shot: %d frames in %.2f s", mel_ref.shape[-1], t_one)
        for context in [int(c) for c in args.contexts.split(",")]:
            ours_s3gen, legacy_s3gen = CountingS3Gen(s3gen), CountingS3Gen(s3gen)
            (mel, wav), t_ours = timed(device, lambda: ours(ours_s3gen, ref, tokens, noise, args.chunk, context,
                                                            args.lookahead))
            wav_legacy, t_legacy = timed(device, lambda: legacy(legacy_s3gen, ref, tokens, noise, args.chunk,
                                                                context))
            ours_work = {"tokens": ours_s3gen.tokens, "calls": ours_s3gen.calls}
            legacy_work = {"tokens": legacy_s3gen.tokens, "calls": legacy_s3gen.calls}
            mel, wav, wav_legacy = mel.cpu(), wav.cpu(), wav_legacy.cpu()
            row = {
                "context_window": context,
                "ours": {"mel_snr_db": snr_db(mel_ref, mel), "wav_snr_db": snr_db(wav_ref, wav),
                         "spectral_snr_db": spectral_snr_db(wav_ref, wav), "seconds": t_ours,
                         "flow_calls": ours_work["calls"],
                         "flow_tokens_per_emitted_token": ours_work["tokens"] / args.tokens,
                         "samples": int(wav.shape[-1])},
                "upstream_resynthesis": {"wav_snr_db": snr_db(wav_ref, wav_legacy),
                                         "spectral_snr_db": spectral_snr_db(wav_ref, wav_legacy),
                                         "seconds": t_legacy, "flow_calls": legacy_work["calls"],
                                         "flow_tokens_per_emitted_token": legacy_work["tokens"] / args.tokens,
                                         "samples": int(wav_legacy.shape[-1])},
            }
            log.info("context %3d  ours: mel %.1f dB, wav %.1f dB, spec %.1f dB, %.2f tok/tok, %.1f s | "
                     "upstream: wav %.1f dB, spec %.1f dB, %.2f tok/tok, %.1f s", context,
                     row["ours"]["mel_snr_db"], row["ours"]["wav_snr_db"], row["ours"]["spectral_snr_db"],
                     row["ours"]["flow_tokens_per_emitted_token"], t_ours,
                     row["upstream_resynthesis"]["wav_snr_db"], row["upstream_resynthesis"]["spectral_snr_db"],
                     row["upstream_resynthesis"]["flow_tokens_per_emitted_token"], t_legacy)
            rows.append(row)
    result = {
        "schema": "chatterbox-fast/stream-fidelity/1",
        "environment": environment(device, args.commit),
        "weights": "synthetic salt 0",
        "config": {"tokens": args.tokens, "chunk": args.chunk, "lookahead_tokens": args.lookahead,
                   "prompt_tokens": int(ref.prompt_token.shape[1]), "vocoder_noise": "zeros",
                   "threads": torch.get_num_threads()},
        "one_shot_seconds": t_one,
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=float))
    out.with_suffix(".md").write_text(markdown(result))
    log.info("wrote %s", out.with_suffix(".json"))
    return 0


def _one_shot(s3gen, ref, tokens, noise):
    mel = s3gen.flow_inference(tokens, ref, cfm_noise=noise)
    wav, _ = s3gen.hift_inference(mel, SourceNoise.zeros(1, mel.shape[-1] * SAMPLES_PER_FRAME, device=mel.device))
    return mel, s3gen.apply_trim_fade(wav)


def markdown(result: dict) -> str:
    c = result["config"]
    lines = [f"# Streaming fidelity ({result['environment'].get('device_name', '?')}, {c['tokens']} tokens, "
             f"chunk {c['chunk']}, prompt {c['prompt_tokens']} tokens)", "",
             "| context | ours mel SNR | ours wav SNR | ours spectral SNR | ours flow tok/tok | ours s "
             "| upstream wav SNR | upstream spectral SNR | upstream flow tok/tok | upstream s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        o, u = r["ours"], r["upstream_resynthesis"]
        lines.append(f"| {r['context_window']} | {o['mel_snr_db']:.1f} dB | {o['wav_snr_db']:.1f} dB | "
                     f"{o['spectral_snr_db']:.1f} dB | {o['flow_tokens_per_emitted_token']:.2f} | {o['seconds']:.1f} | "
                     f"{u['wav_snr_db']:.1f} dB | {u['spectral_snr_db']:.1f} dB | "
                     f"{u['flow_tokens_per_emitted_token']:.2f} | {u['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
