"""The engine: built once from float32 weights and an ``OptConfig``, it owns every runtime choice
(its own transformed copy of the models, eager or graphed T3 runner, graph wrappers, compiled code,
the graph registry) and runs each request as its own ``Session``.

Every public method may be called from several threads at once: requests share only read-only
weights and the runners, whose shared buffers are used under the graph registry's lock.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..conditionals import Conditionals
from ..constants import S3GEN_SR
from ..loader import Models
from ..models.s3gen.hift_stream import HiFTStreamer
from ..models.t3.fused_decode import FusedDecoder
from ..models.t3.sampling import RowProcessing
from ..optim.components import component_specs, models_get, models_set
from ..optim.config import OptConfig
from ..optim.modes import attention_context, autograd_context
from ..streaming import StreamingMetrics
from ..text import EnTokenizer, TextSplitConfig, check_encodable, drop_invalid_tokens, punc_norm, split_text
from ..voice import VoiceConfig, prepare_conditionals
from ..watermark import Watermarker, watermark_available
from .graph_modules import BucketedEstimator, GraphedForward
from .graphs import GraphRegistry
from .materialize import materialize
from .request import SynthesisRequest
from .session import Session, SynthesisResult
from .s3gen_scheduler import S3GenScheduler
from .slot_runner import SlotRunner
from .t3_batcher import T3Batcher
from .t3_runner import EagerT3Runner, GraphedT3Runner, T3Request, T3RunnerConfig
from .t3_stream import T3Stream
from .t3_state import default_pick

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    t3: T3RunnerConfig = field(default_factory=T3RunnerConfig.published)
    # with OptConfig.s3gen_scheduling: streamed chunks of up to this many requests share one CFM call
    s3gen_batch: int = 1
    text_split: TextSplitConfig = field(default_factory=TextSplitConfig.published)
    voice: VoiceConfig = field(default_factory=VoiceConfig.published)

    @classmethod
    def published(cls) -> "EngineConfig":
        return cls()


# torch.compile(dynamic=False) compiles once per input shape. T3's compiled pieces see one shape per
# decode batch bucket and one per captured prefill length; with fullgraph=True, going past dynamo's
# recompile limit (8 by default) is a hard error, so the engine raises the limit to cover its shapes
# with this margin on top (eager prefills of prompts longer than the captured ones add shapes).
COMPILE_SHAPES_MARGIN = 16


def allow_recompiles(shapes: int) -> None:
    import torch._dynamo.config as dynamo_config

    needed = shapes + COMPILE_SHAPES_MARGIN
    if dynamo_config.recompile_limit < needed:
        dynamo_config.recompile_limit = needed


def graph_safe_compile(fn, mode: str):
    """``torch.compile`` for code that runs inside the engine's own CUDA graphs: the modes that would
    capture graphs of their own run as their no-cudagraphs equivalents."""
    kwargs: dict = {"fullgraph": True, "dynamic": False}
    if mode == "max-autotune":
        kwargs["mode"] = "max-autotune-no-cudagraphs"
    elif mode not in ("default", "reduce-overhead"):
        kwargs["mode"] = mode
    return torch.compile(fn, **kwargs)


class Engine:
    def __init__(self, models: Models, tokenizer: EnTokenizer, opt: OptConfig, device: torch.device | str,
                 cfg: EngineConfig | None = None) -> None:
        self.models = models
        self.tokenizer = tokenizer
        self.opt = opt
        self.device = torch.device(device)
        self.cfg = cfg or EngineConfig.published()
        self.sample_rate = S3GEN_SR
        self.t3_stop_token = models.t3.cfg.stop_speech_token
        on_cuda = self.device.type == "cuda"
        wants_graphs = any(opt.component(name).cuda_graphs for name in component_specs())
        if wants_graphs and not on_cuda:
            log.warning("cuda_graphs needs a CUDA device; on %s everything runs eagerly", self.device)
        self.graphs = GraphRegistry(self.device, enabled=wants_graphs)
        self._swap_compiled()
        self._swap_graphed()
        hift = models_get(models, component_specs()["hift"].path)
        self.streamer = HiFTStreamer(getattr(hift, "_orig_mod", hift))
        self.t3_runner = self._t3_runner()
        self.t3_batcher = (T3Batcher(self.t3_runner, opt.stop_check_every)
                           if opt.t3_batching and isinstance(self.t3_runner, SlotRunner) else None)
        self.s3gen_scheduler = (S3GenScheduler(self.context, self.cfm_steps, self.cfg.s3gen_batch)
                                if opt.s3gen_scheduling else None)
        self._watermarker: Watermarker | None = None
        self._watermark_lock = threading.Lock()
        self.watermark_available = watermark_available()

    @classmethod
    def build(cls, weights: Models, tokenizer: EnTokenizer, opt: OptConfig, device: torch.device | str,
              cfg: EngineConfig | None = None) -> "Engine":
        """An engine on its own copy of ``weights`` (float32, left untouched) transformed by ``opt``."""
        return cls(materialize(weights, opt, torch.device(device)), tokenizer, opt, device, cfg)

    # ------------------------------------------------------------------ build
    def _swap_compiled(self) -> None:
        """``compile`` of every component but T3 (whose decode compiles its own pieces): the component
        is swapped for ``torch.compile(component)`` (its forward compiled)."""
        for name, spec in component_specs().items():
            mode = self.opt.component(name).compile
            if mode is None or name == "t3":
                continue
            module = models_get(self.models, spec.path)
            graphed = self.opt.component(name).cuda_graphs and self.graphs.enabled
            models_set(self.models, spec.path, graph_safe_compile(module, mode) if graphed else
                       (torch.compile(module) if mode == "default" else torch.compile(module, mode=mode)))

    def _swap_graphed(self) -> None:
        if not self.graphs.enabled:
            return
        opt = self.opt
        specs = component_specs()
        if opt.cfm_estimator.cuda_graphs:
            path = specs["cfm_estimator"].path
            models_set(self.models, path, BucketedEstimator(models_get(self.models, path), self.graphs,
                                                            "cfm_estimator", opt.cfm_bucket_frames))
        for name in ("campplus", "voice_encoder"):
            if opt.component(name).cuda_graphs:
                path = specs[name].path
                models_set(self.models, path, GraphedForward(models_get(self.models, path), self.graphs, name))

    def _fused_decoder(self) -> FusedDecoder | None:
        opt, t3 = self.opt, self.models.t3
        if not opt.t3_fused_decode:
            return None
        on_cuda = self.device.type == "cuda"
        with torch.inference_mode(False), torch.no_grad():
            fused = FusedDecoder.pack(t3.tfmr, gemv_fusion=opt.t3_gemv_fusion)
        for wanted, what in ((opt.t3_gemv, "t3_gemv"), (opt.t3_decode_attention, "t3_decode_attention")):
            if wanted and not on_cuda:
                log.warning("%s is a CUDA kernel; on %s the fused decode uses torch", what, self.device)
        if opt.t3_gemv and on_cuda:
            from ..kernels.small_m_linear import small_m_linear

            fused = fused.with_linear(small_m_linear)
        if opt.t3_decode_attention and on_cuda:
            from ..kernels.decode_attention import decode_attention

            fused = fused.with_attention(decode_attention)
        if opt.t3.compile is not None and on_cuda:
            fused = fused.with_kernels(graph_safe_compile(fused.outputs_fn, opt.t3.compile),
                                       graph_safe_compile(fused.norm_fn, opt.t3.compile))
        return fused

    def _t3_runner(self):
        opt, t3 = self.opt, self.models.t3
        fused = self._fused_decoder()
        compiled = opt.t3.compile is not None and self.device.type == "cuda"
        if compiled:
            t3_cfg = self.cfg.t3
            allow_recompiles(len(t3_cfg.batch_buckets) + t3_cfg.max_prefill // t3_cfg.prefill_bucket)
        pick = graph_safe_compile(default_pick, opt.t3.compile) if compiled and fused is not None else default_pick
        if opt.t3.compile is not None and fused is None:
            path = component_specs()["t3"].path + ".tfmr"
            models_set(self.models, path, torch.compile(models_get(self.models, path)))
        if opt.t3.cuda_graphs and self.graphs.enabled:
            defaults = SynthesisRequest("").sampling()
            cfg = self.cfg.t3 if opt.t3_batching else dataclasses.replace(self.cfg.t3, batch_buckets=(1,))
            return GraphedT3Runner(t3, fused, self.graphs, cfg, pick,
                                   default_proc=RowProcessing.for_rows([defaults], defaults.order))
        runner = EagerT3Runner(t3, fused, pick)
        if compiled:
            runner.lock = self.graphs.lock  # compiled code is not called from two threads at once
        return runner

    def context(self) -> contextlib.ExitStack:
        """The autograd mode and attention backend the engine's work runs in."""
        stack = contextlib.ExitStack()
        stack.enter_context(autograd_context(self.opt.autograd_mode))
        stack.enter_context(attention_context(self.opt.attention_backend))
        return stack

    def t3_start(self, req: T3Request) -> T3Stream:
        """A request's T3 generation: through the batcher when batching, else stepped by its caller."""
        return (self.t3_batcher or self.t3_runner).start(req)

    def close(self) -> None:
        """Stop the batcher thread (running requests end); the engine's memory goes with its last reference."""
        if self.t3_batcher is not None:
            self.t3_batcher.close()

    # ------------------------------------------------------------------ text
    def count_text_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(punc_norm(text)))

    def text_segments(self, text: str) -> list[str]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        # characters the tokenizer cannot encode are named once and dropped before the split
        return split_text(check_encodable(text, self.tokenizer), self.count_text_tokens, self.cfg.text_split)

    def text_tokens(self, text: str) -> torch.Tensor:
        """Normalised text -> the CFG pair (2, n + 2) with start and stop text tokens."""
        t3 = self.models.t3
        ids = self.tokenizer.text_to_tokens(punc_norm(text)).to(self.device)
        ids = F.pad(ids, (1, 0), value=t3.cfg.start_text_token)
        ids = F.pad(ids, (0, 1), value=t3.cfg.stop_text_token)
        return torch.cat([ids, ids], dim=0).long()

    # ------------------------------------------------------------------ model family
    # What differs between the original model and its descendants (engine/turbo.py overrides these).
    @property
    def cfm_steps(self) -> int | None:
        """Euler steps of the flow's CFM (``OptConfig.cfm_steps``; None: the CFM's own)."""
        return self.opt.cfm_steps

    def t3_sampling(self, request: SynthesisRequest):
        return request.sampling()

    def valid_tokens(self, speech: torch.Tensor) -> torch.Tensor:
        """A segment's T3 tokens (1, N) -> the codes S3Gen renders (M,)."""
        return drop_invalid_tokens(speech[0])

    def chunk_codes(self, tokens: torch.Tensor | None, final: bool) -> torch.Tensor:
        """A streamed chunk's T3 tokens (1, n) (None: none arrived) -> the codes S3Gen renders (M,)."""
        if tokens is None:
            return torch.zeros(0, dtype=torch.long, device=self.device)
        return drop_invalid_tokens(tokens)

    # ------------------------------------------------------------------ requests
    def cfm_noise(self, generator: torch.Generator) -> torch.Tensor:
        return self.models.s3gen.draw_cfm_noise(generator)

    def prepare_conditionals(self, wav_or_path: str | Path | np.ndarray | torch.Tensor, exaggeration: float = 0.5,
                             sample_rate: int | None = None, timer=None) -> Conditionals:
        """A voice from a reference recording, made of ordinary tensors the caller may keep or edit."""
        with autograd_context(self.opt.autograd_mode), attention_context(self.opt.attention_backend):
            conds = prepare_conditionals(self.models.s3gen, self.models.ve, wav_or_path, exaggeration, sample_rate,
                                         self.cfg.voice, timer=timer)
        with torch.inference_mode(False):
            return conds.clone()

    def session(self, request: SynthesisRequest, conds: Conditionals) -> Session:
        if not isinstance(request, SynthesisRequest):
            raise TypeError(f"request must be a SynthesisRequest, got {type(request).__name__}")
        if conds is None:
            raise ValueError("no voice: prepare one with prepare_conditionals(...) first")
        return Session(self, request, conds.to(self.device))

    def synthesize(self, request: SynthesisRequest, conds: Conditionals, timer=None) -> SynthesisResult:
        return self.session(request, conds).synthesize(timer)

    def stream(self, request: SynthesisRequest, conds: Conditionals,
               log_metrics: bool = False) -> Iterator[tuple[torch.Tensor, StreamingMetrics]]:
        return self.session(request, conds).stream(log_metrics)

    def watermark(self, wav: torch.Tensor) -> torch.Tensor:
        with self._watermark_lock:
            if self._watermarker is None:
                self._watermarker = Watermarker()
            return self._watermarker.apply(wav, self.sample_rate)

    def components(self) -> dict[str, nn.Module]:
        """The engine's component modules by name (graph or compile wrappers included)."""
        return {name: models_get(self.models, spec.path) for name, spec in component_specs().items()}
