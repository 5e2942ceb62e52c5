"""CUDA-graph runners owned by the pipeline (not by the modules): the T3 decode step and the CFM
estimator at bucketed lengths. Both are built on ``nn.cuda_graph.CudaGraph`` and, with graphs
disabled (CPU, ``enabled=False``), run the very same code eagerly, which is how they are tested
without a GPU.

* ``T3GraphDecoder``: one replay per generated token = CFG mix + logits processors + draw + "seen"
  update + token embedding + 30-layer decode into its own static KV cache. Attention reads only a
  window of the cache (multiples of ``window`` slots) so a long cache does not make every token pay
  for unused slots; one graph per (window, sampling settings), captured when first reached.
* ``BucketedEstimator``: the ConditionalDecoder at frame counts padded up to a multiple of
  ``bucket_frames`` (padded frames carry mask 0: causal convolutions and the key-padding mask keep
  the valid frames' output unchanged); one graph per padded length.
"""
from __future__ import annotations

import logging
import math
from collections import OrderedDict
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .models.t3.fused_decode import FusedDecoder, allocate_stacked_cache
from .models.t3.llama import KVCache
from .models.t3.sampling import SamplingConfig, exponential_race, mark_seen, pick_by_race, race_pick
from .models.t3.t3 import CFG_BATCH, T3
from .nn.cuda_graph import CudaGraph

log = logging.getLogger(__name__)

DEFAULT_T3_WINDOW = 128
# The prefill graph pads the prompt to a multiple of this many positions (one graph per length).
DEFAULT_PREFILL_BUCKET = 32
DEFAULT_CFM_BUCKET = 64
# Warm-up runs plus the first replay of a capture, each writing one scratch cache slot.
_MIN_WINDOW = 4
# Graphs kept per runner before the least recently used one is dropped.
DEFAULT_MAX_GRAPHS = 64


def race_draw(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One categorical draw per row of ``probs`` (B, V) -> (B, 1), without host syncs.

    argmax(p / E) with E ~ Exp(1) picks id i with probability p_i. It is the algorithm (and the
    generator consumption) of ``torch.multinomial(probs, 1)``, minus that op's validity check,
    which reads the probabilities on the host and so cannot be captured.
    """
    return pick_by_race(probs, exponential_race(probs, generator))


def _default_generator(device: torch.device) -> torch.Generator:
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


class _StepState:
    """Static buffers of one decode session: what the fused step reads and updates in place."""

    def __init__(self, logits: Tensor, vocab: int) -> None:
        device = logits.device
        # Ordinary tensors even when made under inference_mode: later sessions may run outside it.
        with torch.inference_mode(False):
            self.logits = torch.zeros_like(logits)  # (2, V)
            self.seen = torch.zeros(1, vocab, dtype=torch.bool, device=device)
            self.position = torch.zeros(1, dtype=torch.long, device=device)
            self.speech_position = torch.zeros(1, dtype=torch.long, device=device)
            self.token = torch.zeros(1, 1, dtype=torch.long, device=device)

    def load(self, logits: Tensor, seen: Tensor, position: int) -> None:
        self.logits.copy_(logits)
        self.seen.copy_(seen)
        self.position.fill_(position)
        self.speech_position.fill_(1)

    def snapshot(self) -> list[Tensor]:
        return [t.clone() for t in (self.logits, self.seen, self.position, self.speech_position, self.token)]

    def restore(self, saved: list[Tensor]) -> None:
        for dst, src in zip((self.logits, self.seen, self.position, self.speech_position, self.token), saved):
            dst.copy_(src)


class T3GraphDecoder:
    """Explicit decode runner for ``T3.generate_tokens(decoder=...)`` (see the module docstring).

    One generation at a time: starting a new one invalidates an unfinished earlier one (its next
    step raises). The caller's generator is honoured: its state is copied into the decoder's own
    generator (the one the graphs are bound to) at the start and copied back after every token, so
    the caller's generator advances exactly as in the eager loop.
    """

    def __init__(self, t3: T3, window: int = DEFAULT_T3_WINDOW, enabled: bool | None = None,
                 max_graphs: int = DEFAULT_MAX_GRAPHS, fused: FusedDecoder | None = None,
                 prefill_bucket: int = DEFAULT_PREFILL_BUCKET, pick_fn=None) -> None:
        if window < _MIN_WINDOW:
            raise ValueError(f"window must be >= {_MIN_WINDOW} (capture runs that many scratch steps), got {window}")
        if fused is not None and fused.cfg != t3.cfg.llama:
            raise ValueError("the fused decoder was packed from another backbone")
        if prefill_bucket < 1:
            raise ValueError(f"prefill_bucket must be >= 1, got {prefill_bucket}")
        self.t3 = t3
        self.fused = fused
        # (raw logits (2, V), seen (1, V), Exp(1) race (1, V), SamplingConfig) -> token (1, 1):
        # sampling.race_pick, or a compiled version of it (a pass sets it)
        self.pick_fn = pick_fn or race_pick
        self.prefill_bucket = prefill_bucket
        self._prefill_graphs: OrderedDict[tuple, CudaGraph] = OrderedDict()
        self.window = window
        self.enabled = enabled
        self.max_graphs = max_graphs
        self._cache: KVCache | None = None
        self._state: _StepState | None = None
        self._gen: torch.Generator | None = None
        self._graphs: OrderedDict[tuple, CudaGraph] = OrderedDict()
        self._pool = None
        self._session = 0

    # ------------------------------------------------------------------ cache
    def cache(self, min_len: int, device: torch.device, dtype: torch.dtype) -> KVCache:
        """The decoder's static cache, grown (to a multiple of ``window``) when ``min_len`` needs it."""
        c = self._cache
        if self._graphed(torch.device(device)):
            min_len = max(min_len, self.prefill_length(min_len))
        if c is not None and c.max_len >= min_len and c.k.device == torch.device(device) and c.k.dtype == dtype:
            return c
        length = self.window * math.ceil(min_len / self.window)
        length = max(min_len, min(length, self.t3.cfg.llama.max_position_embeddings))
        self.reset()
        with torch.inference_mode(False):
            if self.fused is not None:
                self._cache = allocate_stacked_cache(self.t3.cfg.llama, CFG_BATCH, length, device, dtype)
            else:
                self._cache = self.t3.init_cache(CFG_BATCH, length, device, dtype)
        return self._cache

    def reset(self) -> None:
        """Drop graphs, buffers and cache (frees their memory); the next generation rebuilds them."""
        self._graphs.clear()
        self._prefill_graphs.clear()
        self._cache = None
        self._state = None
        self._gen = None
        self._pool = None
        self._session += 1

    # ------------------------------------------------------------------ prefill
    def prefill_length(self, positions: int) -> int:
        return self.prefill_bucket * math.ceil(positions / self.prefill_bucket)

    def prefill(self, embeds: Tensor, cache: KVCache) -> Tensor:
        """``T3.prefill`` into this decoder's cache -> speech logits of the last position (2, V).

        Graphed: the prompt is padded at the end to a multiple of ``prefill_bucket`` positions and the
        logits are read at the last real one. Causal attention keeps the real positions blind to the
        padding, and the cache slots the padding writes lie past the prompt, where each decode step
        writes its own slot before any query can see it.
        """
        if cache is not self._cache:
            raise RuntimeError("T3GraphDecoder.prefill: use the cache from cache(...)")
        if not self._graphed(embeds.device):
            return self.t3.prefill(embeds, cache)
        real = embeds.shape[1]
        length = self.prefill_length(real)
        if length > cache.max_len:
            raise RuntimeError(f"prefill of {real} positions (padded {length}) does not fit the cache ({cache.max_len})")
        padded = F.pad(embeds, (0, 0, 0, length - real))
        last = torch.full((1,), real - 1, dtype=torch.long, device=embeds.device)
        key = (length, embeds.dtype)
        graph = self._prefill_graphs.get(key)
        if graph is None:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            t3 = self.t3

            def run(x: Tensor, index: Tensor) -> Tensor:
                hidden = t3.tfmr(x, cache)  # (2, length, C)
                return t3.speech_head(hidden.index_select(1, index)[:, 0])

            graph = CudaGraph(run, name=f"t3_prefill[{length}]", clone_outputs=True, pool=self._pool)
            self._prefill_graphs[key] = graph
            while len(self._prefill_graphs) > self.max_graphs:
                self._prefill_graphs.popitem(last=False)
        else:
            self._prefill_graphs.move_to_end(key)
        return graph(padded, last)

    # ------------------------------------------------------------------ tokens
    def tokens(self, logits: Tensor, seen: Tensor, prefix: int, sampling: SamplingConfig,
               generator: torch.Generator | None, steps: int) -> Iterator[Tensor]:
        """``steps`` tokens (1, 1); the k-th is decoded at backbone position ``prefix + k`` before it is yielded."""
        cache = self._cache
        if cache is None or cache.max_len < prefix + steps:
            raise RuntimeError("T3GraphDecoder.tokens: call cache(...) for this generation first")
        self._session += 1
        session = self._session
        source = generator if generator is not None else _default_generator(logits.device)
        if self._state is None or self._state.logits.shape != logits.shape or self._state.logits.dtype != logits.dtype:
            self._graphs.clear()
            self._state = _StepState(logits, self.t3.cfg.speech_vocab_size)
            self._gen = torch.Generator(device=logits.device)
            self._pool = torch.cuda.graph_pool_handle() if self._graphed(logits.device) else None
        state = self._state
        state.load(logits, seen, prefix)
        self._gen.set_state(source.get_state())
        for step in range(steps):
            if self._session != session:
                raise RuntimeError("another generation started on this T3GraphDecoder; "
                                   "it runs one generation at a time")
            graph = self._graph_for(prefix + step + 1, sampling)
            graph()
            source.set_state(self._gen.get_state())
            yield state.token.clone()

    def _graphed(self, device: torch.device) -> bool:
        return device.type == "cuda" and self.enabled is not False

    def _graph_for(self, slots: int, sampling: SamplingConfig) -> CudaGraph:
        width = min(self.window * math.ceil(slots / self.window), self._cache.max_len)
        key = (width, sampling)
        graph = self._graphs.get(key)
        if graph is not None:
            self._graphs.move_to_end(key)
            return graph
        graph = CudaGraph(self._step_fn(width, sampling), name=f"t3_decode[{width}]",
                          enabled=self._graphed(self._state.logits.device), clone_outputs=False,
                          pool=self._pool, generators=(self._gen,) if self._graphed(self._state.logits.device) else ())
        if graph.enabled:
            self._capture_preserving_state(graph, slots - 1, width)
        self._graphs[key] = graph
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        return graph

    def _capture_preserving_state(self, graph: CudaGraph, position: int, width: int) -> None:
        """Capture ``graph`` mid-session: the warm-up runs and the first replay execute the step for
        real, so they run at in-window scratch slots whose cache contents, like the step buffers and
        the generator, are put back afterwards."""
        runs = graph.warmup + 1
        start = max(0, min(position, width - runs))
        state, cache = self._state, self._cache
        saved, gen_state = state.snapshot(), self._gen.get_state()
        slots = slice(start, start + runs)
        saved_k, saved_v = cache.k[:, :, :, slots].clone(), cache.v[:, :, :, slots].clone()
        state.position.fill_(start)
        state.speech_position.fill_(1)
        graph()
        cache.k[:, :, :, slots].copy_(saved_k)
        cache.v[:, :, :, slots].copy_(saved_v)
        state.restore(saved)
        self._gen.set_state(gen_state)

    def _step_fn(self, width: int, sampling: SamplingConfig):
        t3, state, gen, fused, pick = self.t3, self._state, self._gen, self.fused, self.pick_fn
        full = self._cache
        cache = KVCache(full.k[:, :, :, :width], full.v[:, :, :, :width])  # views: same storage

        def decode(embeds: Tensor) -> Tensor:
            if fused is None:
                return t3.decode_step(embeds, state.position, cache)
            return t3.speech_head(fused.decode(embeds, state.position, cache)[:, -1])

        def step() -> Tensor:
            # race_draw's draws on a (1, V) float tensor, then the pick: the same generator use
            token = pick(state.logits, state.seen, exponential_race(state.logits[0:1], gen), sampling)  # (1, 1)
            state.seen.copy_(mark_seen(state.seen, token))
            embeds = t3.next_token_embeds(token, state.speech_position)  # (2, 1, C)
            state.logits.copy_(decode(embeds))
            state.position.add_(1)
            state.speech_position.add_(1)
            state.token.copy_(token)
            return state.token

        return step


class BucketedEstimator:
    """``ConditionalDecoder.forward`` stand-in that pads the frame count to a bucket (see module docstring).

    Call it like the estimator: ``(x, mask, mu, t, spks, cond) -> v``; pass it as ``estimator=`` to
    ``S3Gen.flow_inference`` / ``CausalCFM.forward``.
    """

    def __init__(self, estimator: nn.Module, bucket_frames: int = DEFAULT_CFM_BUCKET, enabled: bool | None = None,
                 max_graphs: int = DEFAULT_MAX_GRAPHS) -> None:
        if bucket_frames < 1:
            raise ValueError(f"bucket_frames must be >= 1, got {bucket_frames}")
        self.estimator = estimator
        self.bucket_frames = bucket_frames
        self.enabled = enabled
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[tuple, CudaGraph] = OrderedDict()
        self._pool = None

    def padded_length(self, frames: int) -> int:
        return self.bucket_frames * math.ceil(frames / self.bucket_frames)

    def reset(self) -> None:
        self._graphs.clear()
        self._pool = None

    def __call__(self, x: Tensor, mask: Tensor | None, mu: Tensor, t: Tensor, spks: Tensor, cond: Tensor) -> Tensor:
        batch, _, frames = x.shape  # (B, n_feats, T)
        pad = self.padded_length(frames) - frames
        if mask is None:
            mask = x.new_ones(batch, 1, frames)
        padded = [F.pad(v, (0, pad)) for v in (x, mask, mu, cond)]  # mask pads with 0: frames ignored
        graph = self._graph_for(padded[0], t)
        v = graph(padded[0], padded[1], padded[2], t, spks, padded[3])  # (B, n_feats, T + pad)
        return v[..., :frames].clone()  # the static output is overwritten by the next replay

    def _graph_for(self, x: Tensor, t: Tensor) -> CudaGraph:
        key = (tuple(x.shape), x.dtype, x.device, t.dtype)
        graph = self._graphs.get(key)
        if graph is not None:
            self._graphs.move_to_end(key)
            return graph
        graphed = x.device.type == "cuda" and self.enabled is not False
        if graphed and self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = CudaGraph(self._run, name=f"cfm_estimator[T={x.shape[-1]}]", enabled=graphed,
                          clone_outputs=False, pool=self._pool)
        self._graphs[key] = graph
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        return graph

    def _run(self, x: Tensor, mask: Tensor, mu: Tensor, t: Tensor, spks: Tensor, cond: Tensor) -> Tensor:
        return self.estimator(x, mask, mu, t, spks, cond)
