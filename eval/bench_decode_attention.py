"""Time T3's one-position attention: Triton ``decode_attention`` against rotary + index_copy_ + SDPA.

    python -m eval.bench_decode_attention [--widths 128,256,512,1024] [--sweep] [--out eval/results/NAME.json]

T3's shape (CFG batch 2, 16 heads of 64, bf16). Each measurement captures ``--calls`` calls in one
CUDA graph over ``--layers`` distinct cache tensors (so the caches are not all L2-resident, as in
a 30-layer decode) and reports the median microseconds per call over ``--reps`` replays. The
position is the last slot of the window (every slot attended). ``--sweep`` also times other
(split_len, block_l, num_warps) configs. Each config is timed twice: ``kernel_us`` on one layer's
cache tensor (``decode_attention``, the eager fused decode) and ``table_kernel_us`` through a
``CacheTable`` over one stacked cache of ``--layers`` layers (``decode_attention_table``, as the
graphed T3 runner's captured decode step calls it). (The kernel's former ``counters`` merge and
``single_pass_max_len`` options are gone: it always runs the split pass and the combine kernel.)
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from .ab import environment
from .bench_small_m_linear import graph_us_per_call

log = logging.getLogger("eval.bench_decode_attention")
SWEEP = [(32, 16, 1), (64, 32, 2), (64, 64, 4), (32, 32, 4), (32, 16, 2), (128, 64, 4)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", default="128,256,512,1024")
    ap.add_argument("--calls", type=int, default=60)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--commit", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from chatterbox.kernels.decode_attention import (DEFAULT_CONFIG, CacheTable, DecodeAttentionConfig,
                                                     decode_attention, decode_attention_table,
                                                     reference_decode_attention)

    dev = torch.device("cuda")
    heads, d = 16, 64
    res = {"schema": "chatterbox-fast/bench-decode-attention/1", "environment": environment(dev, args.commit),
           "settings": {k: v for k, v in vars(args).items() if k not in ("out", "commit")}, "rows": []}
    with torch.inference_mode():
        for width in (int(w) for w in args.widths.split(",")):
            caches = [torch.randn(2, 2, heads, width, d, device=dev, dtype=torch.bfloat16) for _ in range(args.layers)]
            qkv = torch.randn(2, 3 * heads, d, device=dev, dtype=torch.bfloat16)
            cos, sin = torch.rand(d, device=dev, dtype=torch.bfloat16), torch.rand(d, device=dev, dtype=torch.bfloat16)
            pos = torch.tensor([width - 1], device=dev)
            stacked = torch.randn(args.layers, 2, 2, heads, width, d, device=dev, dtype=torch.bfloat16)
            table = CacheTable(ptr=torch.tensor([stacked.data_ptr()], device=dev),
                               length=torch.tensor([width], device=dev), position=pos)
            cos1, sin1 = cos[None], sin[None]
            layers = list(range(args.layers))
            row = {"width": width, "reference_us": graph_us_per_call(
                lambda i: reference_decode_attention(qkv, cos, sin, caches[i], pos, heads, heads),
                layers, args.calls, args.reps)}
            configs = [DEFAULT_CONFIG] + ([DecodeAttentionConfig(*c) for c in SWEEP] if args.sweep else [])
            row["kernel_us"], row["table_kernel_us"] = {}, {}
            for cfg in configs:
                key = f"{cfg.split_len}/{cfg.block_l}/{cfg.num_warps}"
                try:
                    row["kernel_us"][key] = graph_us_per_call(
                        lambda i, c=cfg: decode_attention(qkv, cos, sin, caches[i], pos, heads, heads, cfg=c),
                        layers, args.calls, args.reps)
                    row["table_kernel_us"][key] = graph_us_per_call(
                        lambda i, c=cfg: decode_attention_table(qkv, cos1, sin1, table, i, heads, heads, width, cfg=c),
                        layers, args.calls, args.reps)
                except Exception as exc:  # noqa: BLE001 - a config that does not build is reported, not fatal
                    row.setdefault("errors", {})[key] = f"{type(exc).__name__}: {str(exc)[:200]}"
            dc = DEFAULT_CONFIG
            default = f"{dc.split_len}/{dc.block_l}/{dc.num_warps}"
            row["speedup_default"] = row["reference_us"] / row["kernel_us"][default]
            res["rows"].append(row)
            best = min(row["kernel_us"], key=row["kernel_us"].get)
            if row.get("errors"):
                log.info("width %d: configs that failed: %s", width, row["errors"])
            log.info("width %5d: reference %.2f us, kernel (default %s) %.2f us, table %.2f us, best %s %.2f us",
                     width, row["reference_us"], default, row["kernel_us"][default],
                     row["table_kernel_us"].get(default, float("nan")), best, row["kernel_us"][best])
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
