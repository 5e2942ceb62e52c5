"""One full S3Gen per parity context, shared by the fixtures that need the whole model."""
from __future__ import annotations

from .runner import ComponentMissing, ParityContext


def load_s3gen(ctx: ParityContext):
    cached = ctx.cache.get("s3gen_model")
    if cached is not None:
        return cached
    try:
        from ..models.s3gen.s3gen import S3Gen
    except ImportError as exc:
        raise ComponentMissing(f"S3Gen not assembled yet: {exc}") from exc
    import torch

    with torch.device("meta"):
        model = S3Gen()
    model = ctx.load(model, "s3gen")
    ctx.cache["s3gen_model"] = model
    return model
