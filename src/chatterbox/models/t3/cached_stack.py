"""What every T3 backbone (Llama for the original model, GPT-2 for Turbo and Nano) does around its
layers: a causal pass that may fill a static KV cache, and a fixed-shape decode over that cache."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .kv_cache import KVCache


class CachedStack(nn.Module):
    """Subclasses set ``self.cfg`` (with ``num_layers``) and implement ``_run``; ``position_limit`` is the
    longest sequence the model can take (None: no table bounds it)."""

    def position_limit(self) -> int | None:
        return None

    def _run(self, embeds: Tensor, positions: Tensor, cache: KVCache | None, attend_cache: bool,
             attn_mask: Tensor | None) -> Tensor:
        raise NotImplementedError

    def _check_cache(self, embeds: Tensor, cache: KVCache) -> None:
        if cache.k.shape[0] != self.cfg.num_layers or cache.batch != embeds.shape[0]:
            raise ValueError(f"cache for {cache.k.shape[0]} layers x batch {cache.batch} does not fit "
                             f"{self.cfg.num_layers} layers x batch {embeds.shape[0]}")

    def forward(self, embeds: Tensor, cache: KVCache | None = None) -> Tensor:
        """Causal pass over ``embeds`` (B, S, C) at positions 0..S-1; fills the cache's first S slots if given."""
        s = embeds.shape[1]
        limit = self.position_limit()
        if limit is not None and s > limit:
            raise ValueError(f"{s} positions exceed the position table ({limit})")
        if cache is not None:
            self._check_cache(embeds, cache)
            if s > cache.max_len:
                raise ValueError(f"{s} positions do not fit a cache of length {cache.max_len}")
        positions = torch.arange(s, device=embeds.device)
        return self._run(embeds, positions, cache, attend_cache=False, attn_mask=None)

    def decode(self, embeds: Tensor, positions: Tensor, cache: KVCache) -> Tensor:
        """``embeds`` (B, S, C) at integer ``positions`` (S,) (a device tensor), over the full cache.

        Each query sees the cache slots up to and including its own position; the caller guarantees
        that the slots before ``positions`` hold this generation's keys/values.
        """
        self._check_cache(embeds, cache)
        slots = torch.arange(cache.max_len, device=embeds.device)
        attn_mask = (slots[None, :] <= positions[:, None])[None, None]  # (1, 1, S, max_len)
        return self._run(embeds, positions, cache, attend_cache=True, attn_mask=attn_mask)
