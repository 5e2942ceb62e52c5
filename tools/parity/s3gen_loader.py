"""One full S3Gen per set of weights, shared by the fixtures of a parity run that need the whole model."""
from __future__ import annotations

from .runner import ComponentMissing, ParityContext


def load_s3gen(ctx: ParityContext):
    """The full S3Gen for ``ctx``'s weights (salt or checkpoint), built once and kept in ``ctx.cache``."""
    key = ctx.cache_key("s3gen_model")
    cached = ctx.cache.get(key)
    if cached is not None:
        return cached
    try:
        from chatterbox.models.s3gen.s3gen import S3Gen
    except ImportError as exc:
        raise ComponentMissing(f"S3Gen not assembled yet: {exc}") from exc
    import torch

    with torch.device("meta"):
        model = S3Gen()
    model = ctx.load(model, "s3gen")
    ctx.cache[key] = model
    return model
