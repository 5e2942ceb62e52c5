"""Optimisation passes: apply an ``OptConfig`` to built modules, one component at a time, reversibly.

Per component (table ``_specs``), in this order:

1. **dtype**: floating parameters and buffers of the component's cast subtree are converted, except
   the parts listed as kept in float32 (T3's output heads, so sampling sees float32 logits; HiFT's
   sine source; the S3 tokenizer's log-mel front end and quantizer). Numerically sensitive code
   inside the models (STFT/iSTFT, sine phase, F0, RMSNorm statistics, diffusion time) already
   computes in float32 whatever the weight dtype. Cast boundaries are wrapped around the
   component's entry methods: floating inputs are cast to the weights' dtype on entry and floating
   outputs back to float32 on exit, so every stage still takes and returns what the next expects.
   The original float32 tensors are kept on the CPU (no copy when the model lives there) so that a
   later configuration can restore them exactly: T3 lowered costs 2.1 GB of host memory, the CFM
   estimator 0.29 GB, the flow encoder 0.15 GB, the S3 tokenizer 0.49 GB, HiFT 0.08 GB, CAMPPlus
   0.03 GB, the voice encoder 6 MB.
2. **channels_last**: every ``nn.conv.Conv1d`` / ``ConvTranspose1d`` of the component runs as a 4-D
   ``(B, C, 1, T)`` convolution in channels_last, with its weight stored once in the matching
   strides (same shape, values and keys); ``nn.Conv2d`` weights (CAMPPlus head) go channels_last.
3. **compile**: ``torch.compile`` of the component's hot methods, wrapped from outside.
4. **attention backend** (global field): the component's attention entry points run inside
   ``torch.nn.attention.sdpa_kernel``.
5. **CUDA graphs** (T3, CFM estimator): not a module change but runners the pipeline owns
   (``OptState.t3_decoder``, ``OptState.cfm_estimator``; see ``graphed.py``) and passes explicitly.

Wrappers are instance attributes shadowing the class method; removing them restores the class
behaviour. ``apply_opt`` first undoes what a previous configuration did to a component whose
settings change, so configurations can be switched in any order. Passes run outside
inference_mode, so converted weights are never inference tensors.
"""
from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

from .nn.conv import Conv1d, ConvTranspose1d
from .opt import COMPONENTS, ComponentOpt, OptConfig

log = logging.getLogger(__name__)

_WRAPPER_MARK = "__chatterbox_pass__"
_FLAGS_4D = ("run_as_4d", "channels_last")


# ---------------------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class Boundary:
    """Cast floating inputs of ``path.method`` to that submodule's dtype (except ``keep_args``)
    and, when ``to_float32``, its floating outputs back to float32."""

    path: str
    method: str
    keep_args: tuple[str, ...] = ()
    to_float32: bool = True


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    module_type: type
    cast_path: str = ""  # subtree whose dtype a pass lowers ("" = the whole component)
    keep_float32: tuple[str, ...] = ()  # paths, relative to the cast subtree, that stay float32
    boundaries: tuple[Boundary, ...] = ()
    compile_targets: tuple[tuple[str, str], ...] = ()  # (submodule path, method)
    graph_targets: tuple[tuple[str, str], ...] = ()  # methods run as per-shape CUDA graphs (cuda_graphs)
    attention_targets: tuple[tuple[str, str], ...] = ()


@functools.lru_cache(maxsize=1)
def _specs() -> dict[str, ComponentSpec]:
    # Imported here: the model modules are heavy and import this package's nn helpers.
    from .models.s3gen.decoder import ConditionalDecoder
    from .models.s3gen.encoder import UpsampleConformerEncoder
    from .models.s3gen.hift import HiFTGenerator
    from .models.s3gen.xvector import CAMPPlus
    from .models.s3tokenizer import S3Tokenizer
    from .models.t3.t3 import T3
    from .models.voice_encoder import VoiceEncoder

    specs = [
        ComponentSpec("s3tokenizer", S3Tokenizer, cast_path="encoder",
                      boundaries=(Boundary("encoder", "forward"),),
                      compile_targets=(("encoder", "forward"),), attention_targets=(("encoder", "forward"),)),
        ComponentSpec("voice_encoder", VoiceEncoder, boundaries=(Boundary("", "forward"),),
                      compile_targets=(("", "forward"),), graph_targets=(("", "forward"),)),
        ComponentSpec("campplus", CAMPPlus, boundaries=(Boundary("", "forward_with_intermediates"),),
                      compile_targets=(("", "forward_with_intermediates"),), graph_targets=(("", "forward"),)),
        ComponentSpec("t3", T3, keep_float32=("speech_head", "text_head"),
                      boundaries=(Boundary("cond_enc", "forward", to_float32=False),
                                  Boundary("speech_head", "forward"), Boundary("text_head", "forward")),
                      compile_targets=(("", "decode_step"), ("tfmr", "forward")),
                      attention_targets=(("", "decode_step"), ("", "prefill"), ("", "forward"),
                                         ("cond_enc", "forward"))),
        ComponentSpec("flow_encoder", UpsampleConformerEncoder, boundaries=(Boundary("", "forward"),),
                      compile_targets=(("", "forward"),), attention_targets=(("", "forward"),)),
        ComponentSpec("cfm_estimator", ConditionalDecoder, boundaries=(Boundary("", "forward", keep_args=("t",)),),
                      compile_targets=(("", "forward"),), attention_targets=(("", "forward"),)),
        # HiFT casts its inputs itself and returns float32 (see hift.py), so no boundary is needed.
        ComponentSpec("hift", HiFTGenerator, keep_float32=("m_source", "f0_predictor"),
                      compile_targets=(("", "decode_spec"), ("f0_predictor", "forward"))),
    ]
    return {s.name: s for s in specs}


def component_spec(name: str) -> ComponentSpec:
    if name not in COMPONENTS:
        raise ValueError(f"unknown component {name!r}; known: {COMPONENTS}")
    return _specs()[name]


def pipeline_components(tts: Any) -> dict[str, nn.Module]:
    """The seven components of a ``ChatterboxTTS``-like object (``t3``, ``s3gen``, ``ve``)."""
    flow = tts.s3gen.flow
    return {
        "s3tokenizer": tts.s3gen.tokenizer,
        "voice_encoder": tts.ve,
        "campplus": tts.s3gen.speaker_encoder,
        "t3": tts.t3,
        "flow_encoder": flow.encoder,
        "cfm_estimator": flow.decoder.estimator,
        "hift": tts.s3gen.mel2wav,
    }


def find_components(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every component found in ``root`` (``root`` itself included), by type."""
    by_type = [(spec.module_type, name) for name, spec in _specs().items()]
    found = []
    for module in root.modules():
        for cls, name in by_type:
            if isinstance(module, cls):
                found.append((name, module))
    return found


# ---------------------------------------------------------------------------------------- state
@dataclass(frozen=True)
class _Plan:
    comp: ComponentOpt
    attention_backend: str
    # T3 only: the decode runs on packed weights, and ``comp.compile`` compiles its per-layer kernels
    # (``_refresh_runners``) instead of wrapping the component's own methods.
    fused_decode: bool = False


@dataclass
class _Applied:
    module: nn.Module
    plan: _Plan
    backup: dict[str, torch.Tensor] = field(default_factory=dict)  # float32 originals, on the CPU
    wrapped: list[tuple[nn.Module, str]] = field(default_factory=list)


@dataclass
class OptState:
    """What ``apply_opt`` did to a pipeline, and the CUDA-graph runners it made.

    ``t3_decoder`` goes to ``T3.inference(decoder=...)``, ``cfm_estimator`` to
    ``S3Gen.flow_inference(estimator=...)``; both are None unless their component has
    ``cuda_graphs`` on a CUDA device.
    """

    opt: OptConfig = field(default_factory=OptConfig.reference)
    applied: dict[str, _Applied] = field(default_factory=dict)
    t3_decoder: Any = None
    cfm_estimator: Any = None

    def backup_bytes(self) -> int:
        """Host memory held to restore float32 weights."""
        return sum(t.numel() * t.element_size() for a in self.applied.values() for t in a.backup.values())


# ---------------------------------------------------------------------------------------- entry points
def apply_opt(tts: Any, opt: OptConfig) -> OptState:
    """Apply ``opt`` to a pipeline's components; store and return its ``OptState`` (``tts.opt_state``).

    Components whose settings are unchanged are left alone (their compiled code and graphs are
    kept); the others are restored to the reference state first, then converted.
    """
    if not isinstance(opt, OptConfig):
        raise TypeError(f"opt must be an OptConfig, got {type(opt).__name__}")
    state = getattr(tts, "opt_state", None)
    if not isinstance(state, OptState):
        state = OptState()
    components = pipeline_components(tts)
    apply_to_components(components.items(), opt, state)
    _refresh_runners(state, components, opt)
    state.opt = opt
    tts.opt_state = state
    return state


def apply_to_components(components: Iterable[tuple[str, nn.Module]], opt: OptConfig,
                        state: OptState | None = None) -> OptState:
    """Apply ``opt`` to (name, module) pairs (e.g. from ``find_components``); usable without a pipeline."""
    state = state if state is not None else OptState()
    with torch.inference_mode(False), torch.no_grad():
        for name, module in components:
            spec = component_spec(name)
            if not isinstance(module, spec.module_type):
                raise TypeError(f"component {name} must be a {spec.module_type.__name__}, got {type(module).__name__}")
            plan = _Plan(opt.component(name), opt.attention_backend, fused_decode=name == "t3" and opt.t3_fused_decode)
            done = state.applied.get(name)
            if done is not None and done.module is module and done.plan == plan:
                continue
            if done is not None and done.module is module:
                _undo(done)
            state.applied[name] = _apply_component(spec, module, plan)
    return state


def reset_components(state: OptState) -> None:
    """Undo every pass recorded in ``state`` (weights back to float32, layouts and methods restored)."""
    with torch.inference_mode(False), torch.no_grad():
        for done in state.applied.values():
            _undo(done)
    state.applied.clear()
    state.t3_decoder = None
    state.cfm_estimator = None
    state.opt = OptConfig.reference()


def _refresh_runners(state: OptState, components: dict[str, nn.Module], opt: OptConfig) -> None:
    from .graphed import BucketedEstimator, T3GraphDecoder

    t3, estimator = components["t3"], components["cfm_estimator"]
    graphed = opt.t3.cuda_graphs and _on_cuda(t3, "t3")
    if graphed or opt.t3_fused_decode:
        if not (isinstance(state.t3_decoder, T3GraphDecoder) and state.t3_decoder.t3 is t3
                and state.opt.t3 == opt.t3 and state.opt.attention_backend == opt.attention_backend
                and state.opt.t3_fused_decode == opt.t3_fused_decode and state.opt.t3_gemv == opt.t3_gemv
                and state.opt.t3_decode_attention == opt.t3_decode_attention
                and state.opt.t3_gemv_fusion == opt.t3_gemv_fusion
                and state.t3_decoder.enabled == graphed):
            fused = (_fused_decoder(t3, opt.t3.compile, graphed, opt.t3_gemv, opt.t3_decode_attention,
                                    opt.t3_gemv_fusion) if opt.t3_fused_decode else None)
            pick = _compiled_pick(opt.t3.compile) if fused is not None and graphed and opt.t3.compile else None
            state.t3_decoder = T3GraphDecoder(t3, fused=fused, enabled=graphed, pick_fn=pick)
    else:
        state.t3_decoder = None
    if opt.cfm_estimator.cuda_graphs and _on_cuda(estimator, "cfm_estimator"):
        if not (isinstance(state.cfm_estimator, BucketedEstimator) and state.cfm_estimator.estimator is estimator
                and state.opt.cfm_estimator == opt.cfm_estimator
                and state.opt.attention_backend == opt.attention_backend
                and state.cfm_estimator.bucket_frames == opt.cfm_bucket_frames):
            state.cfm_estimator = BucketedEstimator(estimator, opt.cfm_bucket_frames)
    else:
        state.cfm_estimator = None


def _fused_decoder(t3: nn.Module, compile_mode: str | None, graphed: bool, gemv: bool = False,
                   decode_attention: bool = False, gemv_fusion: bool = False):
    """Pack T3's backbone for the fused decode; compile its two per-layer kernels when asked (CUDA).

    Inside a CUDA-graphed step the compiled code must not capture graphs of its own, so the modes
    that would ("reduce-overhead", "max-autotune") run as their no-cudagraphs equivalents there.
    """
    from .models.t3.fused_decode import FusedDecoder, attention_inputs, attention_outputs, rms_norm

    with torch.inference_mode(False), torch.no_grad():
        fused = FusedDecoder.pack(t3.tfmr, interleave_gate_up=gemv_fusion).with_gemv_fusion(gemv_fusion)
    if gemv:
        if fused.final_norm.device.type == "cuda":
            from .kernels.small_m_linear import small_m_linear

            fused = fused.with_linear(small_m_linear)
        else:
            log.warning("t3_gemv is a CUDA kernel; on %s the fused decode uses F.linear", fused.final_norm.device)
    if decode_attention:
        if fused.final_norm.device.type == "cuda":
            from .kernels.decode_attention import decode_attention as attend

            fused = fused.with_attention(attend)
        else:
            log.warning("t3_decode_attention is a CUDA kernel; on %s the fused decode uses SDPA",
                        fused.final_norm.device)
    if compile_mode is None:
        return fused
    if fused.final_norm.device.type != "cuda":
        log.warning("t3.compile with t3_fused_decode compiles the fused kernels on CUDA only; "
                    "on %s they run eagerly", fused.final_norm.device)
        return fused
    mode = compile_mode
    if graphed and mode in ("reduce-overhead", "max-autotune"):
        mode = "max-autotune-no-cudagraphs" if mode == "max-autotune" else "default"
    kwargs = {"fullgraph": True, "dynamic": False}
    if mode != "default":
        kwargs["mode"] = mode
    return fused.with_kernels(torch.compile(attention_inputs, **kwargs), torch.compile(attention_outputs, **kwargs),
                              torch.compile(rms_norm, **kwargs))


def _compiled_pick(compile_mode: str):
    """``sampling.race_pick`` compiled (the graphed decode's guidance, logit processors, softmax and
    pick: ~15 small kernels a token eagerly); graph-safe modes only, as in ``_fused_decoder``."""
    from .models.t3.sampling import race_pick

    kwargs: dict = {"fullgraph": True, "dynamic": False}
    if compile_mode not in ("default", "reduce-overhead", "max-autotune"):
        kwargs["mode"] = compile_mode
    elif compile_mode == "max-autotune":
        kwargs["mode"] = "max-autotune-no-cudagraphs"
    return torch.compile(race_pick, **kwargs)


def _on_cuda(module: nn.Module, name: str) -> bool:
    device = next(module.parameters()).device
    if device.type == "cuda":
        return True
    log.warning("%s.cuda_graphs needs a CUDA device; the model is on %s, so %s stays eager", name, device, name)
    return False


# ---------------------------------------------------------------------------------------- one component
def _apply_component(spec: ComponentSpec, module: nn.Module, plan: _Plan) -> _Applied:
    done = _Applied(module=module, plan=plan)
    comp = plan.comp
    lowered = comp.torch_dtype != torch.float32
    if lowered:
        done.backup = lower_dtype(module.get_submodule(spec.cast_path), comp.torch_dtype, spec.keep_float32,
                                  prefix=spec.cast_path)
    if comp.channels_last:
        set_channels_last(module, True)
    if comp.compile is not None and not plan.fused_decode:
        for path, method in spec.compile_targets:
            _wrap(done, module.get_submodule(path), method, functools.partial(_compiled, mode=comp.compile))
    if plan.attention_backend != "sdpa":
        for path, method in spec.attention_targets:
            _wrap(done, module.get_submodule(path), method,
                  functools.partial(_with_attention, backend=plan.attention_backend))
    if lowered:
        for b in spec.boundaries:
            target = module.get_submodule(b.path)
            _wrap(done, target, b.method, functools.partial(
                _cast_boundary, dtype=_module_dtype(target), keep_args=b.keep_args, to_float32=b.to_float32))
    if comp.cuda_graphs:
        for path, method in spec.graph_targets:
            _wrap(done, module.get_submodule(path), method, functools.partial(ShapeGraphs, name=f"{spec.name}.{method}"))
    return done


def _undo(done: _Applied) -> None:
    for owner, method in reversed(done.wrapped):
        owner.__dict__.pop(method, None)
    done.wrapped.clear()
    if done.plan.comp.channels_last:
        set_channels_last(done.module, False)
    if done.backup:
        restore_tensors(done.module, done.backup)
        done.backup = {}


# ---------------------------------------------------------------------------------------- dtype
def _floating_slots(module: nn.Module, keep: tuple[str, ...]):
    """(qualified name, owner, attribute, is_parameter) of floating params/buffers outside ``keep``."""
    for sub_name, sub in module.named_modules():
        if any(sub_name == k or sub_name.startswith(k + ".") for k in keep):
            continue
        for slots, is_param in ((sub._parameters, True), (sub._buffers, False)):
            for attr, t in slots.items():
                if t is not None and t.is_floating_point():
                    yield (f"{sub_name}.{attr}" if sub_name else attr), sub, attr, is_param


def lower_dtype(module: nn.Module, dtype: torch.dtype, keep: tuple[str, ...] = (),
                prefix: str = "") -> dict[str, torch.Tensor]:
    """Convert ``module``'s floating tensors (except under ``keep``) to ``dtype``; return the
    originals keyed by their name under the component (``prefix`` + name), moved to the CPU."""
    backup: dict[str, torch.Tensor] = {}
    for qual, owner, attr, is_param in _floating_slots(module, keep):
        t = owner._parameters[attr] if is_param else owner._buffers[attr]
        if t.dtype == dtype:
            continue
        key = f"{prefix}.{qual}" if prefix else qual
        backup[key] = t.detach().to("cpu")
        if is_param:
            t.data = t.data.to(dtype)
        else:
            owner._buffers[attr] = t.to(dtype)
    return backup


def restore_tensors(module: nn.Module, backup: dict[str, torch.Tensor]) -> None:
    """Put the tensors saved by ``lower_dtype`` back (on each slot's current device)."""
    for key, saved in backup.items():
        owner_path, _, attr = key.rpartition(".")
        owner = module.get_submodule(owner_path)
        if attr in owner._parameters:
            p = owner._parameters[attr]
            p.data = saved.to(p.device)
        elif attr in owner._buffers:
            owner._buffers[attr] = saved.to(owner._buffers[attr].device)
        else:
            raise RuntimeError(f"cannot restore {key}: the module no longer has it (was it changed after the pass?)")


def _module_dtype(module: nn.Module) -> torch.dtype:
    for t in module.parameters():
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if torch.is_tensor(value):
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_cast(v, dtype) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


def _cast_boundary(fn: Callable, *, dtype: torch.dtype, keep_args: tuple[str, ...], to_float32: bool) -> Callable:
    names = list(inspect.signature(fn).parameters)

    def boundary(*args, **kwargs):
        args = tuple(a if i < len(names) and names[i] in keep_args else _cast(a, dtype) for i, a in enumerate(args))
        kwargs = {k: (v if k in keep_args else _cast(v, dtype)) for k, v in kwargs.items()}
        out = fn(*args, **kwargs)
        return _cast(out, torch.float32) if to_float32 else out

    return boundary


# ---------------------------------------------------------------------------------------- channels_last
def _channels_last_3d(w: torch.Tensor) -> torch.Tensor:
    """(O, I, k) with strides (I*k, 1, I): ``w.unsqueeze(2)`` is then channels_last-contiguous."""
    return w.permute(0, 2, 1).contiguous().permute(0, 2, 1)


def set_channels_last(module: nn.Module, on: bool) -> None:
    """Switch every convolution under ``module`` to (or back from) 4-D channels_last execution."""
    for sub in module.modules():
        if isinstance(sub, (Conv1d, ConvTranspose1d)):
            if on:
                sub.run_as_4d = True
                sub.channels_last = True
            else:
                for flag in _FLAGS_4D:
                    sub.__dict__.pop(flag, None)
            if not parametrize.is_parametrized(sub, "weight"):
                w = sub.weight
                w.data = _channels_last_3d(w.data) if on else w.data.contiguous()
        elif isinstance(sub, nn.Conv2d):
            fmt = torch.channels_last if on else torch.contiguous_format
            sub.weight.data = sub.weight.data.contiguous(memory_format=fmt)
        elif isinstance(sub, (nn.Conv1d, nn.ConvTranspose1d)):
            log.warning("%s is a plain torch 1-D conv and cannot run channels_last; use chatterbox.nn.conv",
                        type(sub).__name__)


# ---------------------------------------------------------------------------------------- wrappers
def _wrap(done: _Applied, owner: nn.Module, method: str, make: Callable[[Callable], Callable]) -> None:
    current = getattr(owner, method)
    wrapper = make(current)
    setattr(wrapper, _WRAPPER_MARK, True)
    owner.__dict__[method] = wrapper
    done.wrapped.append((owner, method))


def _compiled(fn: Callable, *, mode: str) -> Callable:
    compiled = torch.compile(fn) if mode == "default" else torch.compile(fn, mode=mode)

    def run(*args, **kwargs):
        return compiled(*args, **kwargs)

    return run


class ShapeGraphs:
    """``fn(tensor) -> tensor`` replayed from a CUDA graph per exact input shape (the
    ``cuda_graphs`` pass of the per-voice encoders: a reference of a length seen before replays).

    Calls with CPU tensors, or while autograd records, run ``fn`` eagerly. The least recently used
    graph beyond ``max_graphs`` is dropped.
    """

    def __init__(self, fn: Callable, *, name: str, max_graphs: int = 8) -> None:
        from collections import OrderedDict

        self.fn = fn
        self.name = name
        self.max_graphs = max_graphs
        self.graphs: OrderedDict = OrderedDict()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from .nn.cuda_graph import CudaGraph

        if not torch.is_tensor(x) or x.device.type != "cuda" or (torch.is_grad_enabled() and x.requires_grad):
            return self.fn(x)
        key = (tuple(x.shape), x.dtype, x.device)
        graph = self.graphs.get(key)
        if graph is None:
            graph = CudaGraph(self.fn, name=f"{self.name}{list(x.shape)}", clone_outputs=True)
            self.graphs[key] = graph
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(key)
        return graph(x)


def _with_attention(fn: Callable, *, backend: str) -> Callable:
    from .opt import attention_context

    def run(*args, **kwargs):
        with attention_context(backend):
            return fn(*args, **kwargs)

    return run


def is_wrapped(module: nn.Module, method: str) -> bool:
    return getattr(module.__dict__.get(method), _WRAPPER_MARK, False)


__all__ = ["OptState", "apply_opt", "apply_to_components", "component_spec", "find_components",
           "lower_dtype", "pipeline_components", "reset_components", "restore_tensors", "set_channels_last"]
