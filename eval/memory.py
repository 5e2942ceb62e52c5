"""Where the GPU memory goes for one OptConfig, in a fresh process (what one server process holds).

    python -m eval.memory --device cuda --config fast [--tokens 250] [--commit SHA] [--out eval/results/NAME]

Loads the synthetic checkpoint, applies the config, prepares a voice, then runs (after one warm-up
of each, so graphs and compiled code exist as in a serving process) a one-shot generation and a
streaming generation of ``--tokens`` tokens. Records allocated / peak / reserved memory after each
phase, the peak of each phase on its own, and what stays resident: parameter and buffer bytes per
model component of the engine. T3's KV cache is a request's own (allocated when its T3 request
starts, freed with it, so it is inside the phase peaks): reported as the bytes one position takes
(layers x keys and values x the CFG pair's 2 rows x kv heads x head dim x element size) and what the
measured generation's request held (its prompt positions plus ``--tokens``).
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from .ab import environment, resolve_config

log = logging.getLogger("eval.memory")
ROOT = Path(__file__).resolve().parents[1]
TEXT = "Streaming speech synthesis has to start talking almost at once and then keep ahead of the listener."


def tensor_bytes(module: torch.nn.Module, device: torch.device) -> dict:
    """Bytes of the distinct tensors (parameters, buffers) a module holds on ``device``."""
    seen: set[int] = set()
    out = {"params": 0, "buffers": 0}
    for kind, tensors in (("params", module.parameters()), ("buffers", module.buffers())):
        for t in tensors:
            if t.device.type != device.type:
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in seen:
                continue
            seen.add(key)
            out[kind] += storage.nbytes()
    return out


def component_bytes(tts, device: torch.device) -> dict:
    s3 = tts.s3gen
    parts = {"t3": tts.t3, "voice_encoder": tts.ve, "s3_tokenizer": s3.tokenizer, "campplus": s3.speaker_encoder,
             "flow_encoder": s3.flow.encoder, "cfm_estimator": s3.flow.decoder.estimator, "hift": s3.mel2wav}
    out = {name: tensor_bytes(m, device) for name, m in parts.items()}
    out["all_modules"] = tensor_bytes(torch.nn.ModuleList([tts.t3, tts.ve, s3]), device)
    return {k: {a: b / 1e9 for a, b in v.items()} for k, v in out.items()}


def live_blocks_by_owner(top: int = 25) -> list[dict]:
    """Live CUDA allocations grouped by the innermost two chatterbox frames of the call that made
    them (needs ``torch.cuda.memory._record_memory_history`` before the allocations)."""
    owners: dict[str, int] = {}
    for seg in torch.cuda.memory._snapshot().get("segments", []):
        for block in seg.get("blocks", []):
            if block.get("state") != "active_allocated":
                continue
            frames = [f for f in block.get("frames", []) if "/chatterbox/" in f.get("filename", "")]
            label = " < ".join(f"{f['filename'].split('/chatterbox/')[-1]}:{f['line']} {f['name']}"
                               for f in frames[:2]) or "(no chatterbox frame)"
            owners[label] = owners.get(label, 0) + block.get("size", 0)
    ranked = sorted(owners.items(), key=lambda kv: kv[1], reverse=True)[:top]
    return [{"owner": k, "gb": v / 1e9} for k, v in ranked]


def snapshot(device: torch.device) -> dict:
    return {"allocated_gb": torch.cuda.memory_allocated(device) / 1e9,
            "peak_gb": torch.cuda.max_memory_allocated(device) / 1e9,
            "reserved_gb": torch.cuda.memory_reserved(device) / 1e9}


def kv_bytes_per_position(tts) -> int:
    """Bytes of T3's KV cache per position of one request, in the engine's T3 dtype."""
    from chatterbox.models.t3.t3 import CFG_BATCH

    llama = tts.t3.cfg.llama
    element = torch.empty((), dtype=tts.opt.t3.torch_dtype).element_size()
    return llama.num_layers * 2 * CFG_BATCH * llama.num_kv_heads * llama.head_dim * element


def prompt_positions(tts, text: str) -> int:
    """Positions T3's prompt takes for ``text`` with the current voice (conditioning, text, BOS)."""
    t3 = tts.t3
    with torch.inference_mode():
        conds = tts.conds.to(tts.device)
        segments = tts.text_segments(text)
        return max(int(t3.prompt_embeds(conds.t3, t3.check_text(tts.text_tokens(s))).shape[1]) for s in segments)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--config", default="fast")
    ap.add_argument("--tokens", type=int, default=250)
    ap.add_argument("--chunk-size", type=int, default=25)
    ap.add_argument("--trace", action="store_true", help="record allocation stacks; report live blocks by owner")
    ap.add_argument("--commit", default=None)
    ap.add_argument("--out", default=str(ROOT / "eval" / "results" / "memory"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    if device.type != "cuda":
        raise SystemExit("eval.memory measures CUDA memory: pass a CUDA --device")
    from chatterbox import ChatterboxTTS
    from chatterbox.voice import synthetic_reference

    res: dict = {"schema": "chatterbox-fast/memory/1", "environment": environment(device, args.commit),
                 "config": args.config, "tokens": args.tokens, "chunk_size": args.chunk_size,
                 "phases": {}, "phase_peak_gb": {}}
    if args.trace:
        torch.cuda.memory._record_memory_history(max_entries=200000, stacks="python")
    tts = ChatterboxTTS.from_synthetic(device, opt=resolve_config(args.config))
    torch.cuda.synchronize(device)
    res["phases"]["loaded"] = snapshot(device)
    res["resident"] = component_bytes(tts, device)
    wav = synthetic_reference(seconds=10.0)

    def conds():
        tts.prepare_conditionals(wav, sample_rate=24000)

    def oneshot():
        tts.synthesize(TEXT, max_new_tokens=args.tokens, seed=0, watermark=False)

    def stream():
        for _ in tts.generate_stream(TEXT, chunk_size=args.chunk_size, max_new_tokens=args.tokens, seed=0,
                                     print_metrics=False, watermark=False):
            pass

    for name, fn in (("prepare_conditionals", conds), ("generate", oneshot), ("generate_stream", stream)):
        fn()  # warm-up: graphs captured, compiled code built
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        res["phases"][name] = snapshot(device)
        res["phase_peak_gb"][name] = {"peak_gb": torch.cuda.max_memory_allocated(device) / 1e9,
                                      "above_start_gb": (torch.cuda.max_memory_allocated(device) - base) / 1e9}
    per_position = kv_bytes_per_position(tts)
    positions = prompt_positions(tts, TEXT) + args.tokens
    res["t3_kv_bytes_per_position"] = per_position
    res["t3_kv_positions_per_request"] = positions
    res["t3_kv_cache_gb_per_request"] = per_position * positions / 1e9
    if args.trace:
        res["live_by_owner"] = live_blocks_by_owner()
        for row in res["live_by_owner"]:
            log.info("live %.4f GB  %s", row["gb"], row["owner"])
    res["peak_gb"] = max(v["peak_gb"] for v in res["phase_peak_gb"].values())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    for k, v in res["resident"].items():
        log.info("resident %-16s params %.3f GB buffers %.3f GB", k, v["params"], v["buffers"])
    for k, v in res["phases"].items():
        log.info("after %-22s %s", k, {a: round(b, 3) for a, b in v.items()})
    for k, v in res["phase_peak_gb"].items():
        log.info("peak of %-20s %.3f GB (%.3f above its start)", k, v["peak_gb"], v["above_start_gb"])
    log.info("T3 KV cache %d bytes/position, %.4f GB for a request of %d positions; overall peak %.3f GB",
             per_position, res["t3_kv_cache_gb_per_request"], positions, res["peak_gb"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
