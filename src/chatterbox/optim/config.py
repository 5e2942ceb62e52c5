"""Optimisation settings: one frozen ``OptConfig``, a field per component, applied as passes.

``OptConfig.reference()`` is fp32 eager and numerically equal to upstream: the A/B baseline and the
parity target. ``OptConfig.fast()`` is the best configuration measured on a GPU. This module is plain
data: model files never read it, ``optim.passes`` turns it into one-shot transforms of an engine's
own copy of the modules, and the engine (``chatterbox.engine``) reads the runtime fields (autograd
mode, CFM steps, CUDA graphs, ...).

Toggle specs (used by the A/B harness and ``scripts/check_parity.py --opt``) are a preset name
followed by ``+``-separated overrides::

    OptConfig.parse("reference+t3.dtype=bfloat16+hift.channels_last=1+cfm_steps=6")
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

AUTOGRAD_MODES = ("inference_mode", "no_grad", "none")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPONENTS = ("s3tokenizer", "voice_encoder", "campplus", "t3", "flow_encoder", "cfm_estimator", "hift")
# "sdpa" lets torch pick the kernel; the others pin one (with the math kernel as the fallback for
# calls the pinned kernel cannot take, e.g. flash attention with an explicit mask).
ATTENTION_BACKENDS = ("sdpa", "math", "flash", "efficient", "cudnn")
# Components whose convolutions can run as 4-D channels_last (the voice encoder is an LSTM).
CHANNELS_LAST_COMPONENTS = ("s3tokenizer", "campplus", "flow_encoder", "cfm_estimator", "hift")
# Components with a CUDA-graph runner: the T3 decode step (and prefill), the CFM estimator (bucketed
# lengths), and the per-voice encoders (one graph per exact input shape: a reference of the same
# length replays).
CUDA_GRAPH_COMPONENTS = ("t3", "cfm_estimator", "campplus", "voice_encoder")
# Dense layers stored as int8 and run by the CPU's int8 GEMM, activations quantised per call
# (optim/quantize.py). CPU only; T3 only: its decode is one matrix-vector product per weight.
INT8_DYNAMIC = "int8_dynamic"
QUANTIZE_MODES = (None, INT8_DYNAMIC)
QUANTIZE_COMPONENTS = ("t3",)
PRESETS = ("reference", "fast", "cpu")

_SPEC_SEPARATOR = "+"
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_NO_COMPILE = ("none", "off", "0", "false", "eager")
_QUANTIZE_ALIASES = {"int8": INT8_DYNAMIC}
_NO_QUANTIZE = ("none", "off", "0", "false")


@dataclass(frozen=True)
class ComponentOpt:
    dtype: str = "float32"
    channels_last: bool = False
    compile: str | None = None
    cuda_graphs: bool = False
    # None, or how the component's dense layers are quantised ("int8_dynamic": CPU only)
    quantize: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}, got {self.compile!r}")
        if self.quantize not in QUANTIZE_MODES:
            raise ValueError(f"quantize must be one of {QUANTIZE_MODES} ('int8' in a spec), got {self.quantize!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def is_reference(self) -> bool:
        return self == ComponentOpt()


@dataclass(frozen=True)
class OptConfig:
    s3tokenizer: ComponentOpt = field(default_factory=ComponentOpt)
    voice_encoder: ComponentOpt = field(default_factory=ComponentOpt)
    campplus: ComponentOpt = field(default_factory=ComponentOpt)
    t3: ComponentOpt = field(default_factory=ComponentOpt)
    flow_encoder: ComponentOpt = field(default_factory=ComponentOpt)
    cfm_estimator: ComponentOpt = field(default_factory=ComponentOpt)
    hift: ComponentOpt = field(default_factory=ComponentOpt)
    autograd_mode: str = "inference_mode"
    cfm_steps: int = 10
    attention_backend: str = "sdpa"
    # T3 checks for the stop token every this many steps (one host sync per check).
    stop_check_every: int = 8
    # CUDA-graphed CFM estimator: the frame count is padded up to a multiple of this (one graph each).
    cfm_bucket_frames: int = 64
    # T3 decode with packed q/k/v and gate/up projection weights (4 GEMMs a layer instead of 7);
    # the per-layer pieces are what ``t3.compile`` compiles when the decode step is CUDA-graphed.
    t3_fused_decode: bool = False
    # With t3_fused_decode on CUDA: the decode's projections use the small-M Triton GEMV
    # (kernels/small_m_linear.py) instead of cuBLAS.
    t3_gemv: bool = False
    # With t3_fused_decode on CUDA: rotary, the KV-cache write and attention of a decode step run as two
    # Triton kernels (kernels/decode_attention.py) instead of rotary + index_copy_ + mask + SDPA.
    t3_decode_attention: bool = False
    # With t3_fused_decode: the norms, the SiLU gate and the residual adds run inside the projection
    # GEMVs (kernels/fused_gemv.py, CUDA; torch compositions elsewhere).
    t3_gemv_fusion: bool = False
    # With t3.cuda_graphs: continuous batching. One engine thread advances every running request by
    # one token per replay (up to the largest of EngineConfig.t3.batch_buckets at once); requests join
    # and leave at token granularity (engine/t3_batcher.py). Off: each request steps itself.
    t3_batching: bool = False
    # Streaming: one engine worker renders every request's chunks, first chunks first, then by
    # deadline; up to EngineConfig.s3gen_batch chunks of different requests share one CFM call
    # (engine/s3gen_scheduler.py). Off: each request renders its own chunks as they come.
    s3gen_scheduling: bool = False

    def __post_init__(self) -> None:
        if self.autograd_mode not in AUTOGRAD_MODES:
            raise ValueError(f"autograd_mode must be one of {AUTOGRAD_MODES}, got {self.autograd_mode!r}")
        if self.cfm_steps < 1:
            raise ValueError(f"cfm_steps must be >= 1, got {self.cfm_steps}")
        if self.stop_check_every < 1:
            raise ValueError(f"stop_check_every must be >= 1, got {self.stop_check_every}")
        if self.cfm_bucket_frames < 1:
            raise ValueError(f"cfm_bucket_frames must be >= 1, got {self.cfm_bucket_frames}")
        if self.t3_gemv and not self.t3_fused_decode:
            raise ValueError("t3_gemv needs t3_fused_decode (the GEMV runs inside the fused decode)")
        if self.t3_decode_attention and not self.t3_fused_decode:
            raise ValueError("t3_decode_attention needs t3_fused_decode (the kernels run inside the fused decode)")
        if self.t3_gemv_fusion and not self.t3_fused_decode:
            raise ValueError("t3_gemv_fusion needs t3_fused_decode (the kernels run inside the fused decode)")
        if self.t3_batching and not self.t3.cuda_graphs:
            raise ValueError("t3_batching needs t3.cuda_graphs (requests are batched in the captured decode step)")
        if self.t3.cuda_graphs and not self.t3_decode_attention:
            raise ValueError("t3.cuda_graphs needs t3_decode_attention (and so t3_fused_decode): one captured "
                             "decode step serves every request by reading each request's KV cache through a "
                             "pointer table, which only the Triton attention kernel does")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        for name in COMPONENTS:
            comp = getattr(self, name)
            if not isinstance(comp, ComponentOpt):
                raise TypeError(f"{name} must be a ComponentOpt, got {type(comp).__name__}")
            if comp.channels_last and name not in CHANNELS_LAST_COMPONENTS:
                raise ValueError(f"{name} has no convolutions to run channels_last "
                                 f"(supported: {CHANNELS_LAST_COMPONENTS})")
            if comp.cuda_graphs and name not in CUDA_GRAPH_COMPONENTS:
                raise ValueError(f"{name} has no CUDA-graph runner (supported: {CUDA_GRAPH_COMPONENTS})")
            if comp.quantize is not None:
                _check_quantize(name, comp)
        if self.t3.quantize is not None and self.t3_fused_decode:
            raise ValueError("t3.quantize replaces the projection layers whose weights t3_fused_decode packs; "
                             "turn one of them off")

    # ------------------------------------------------------------------ presets
    @classmethod
    def reference(cls) -> "OptConfig":
        """fp32, eager, upstream-equivalent numerics."""
        return cls()

    @classmethod
    def fast(cls) -> "OptConfig":
        """The best configuration measured on one H100 (eval/results/h100-ab.json, patches/).

        T3: bf16 weights, packed q/k/v and gate/up projections (``t3_fused_decode``) whose per-layer
        elementwise work is compiled (``t3.compile``, CUDA only), projections through the small-M
        Triton GEMV (``t3_gemv``) with the norms, SiLU gate and residual adds folded into it
        (``t3_gemv_fusion``), rotary + cache write + attention as Triton kernels
        (``t3_decode_attention``), the sampling step compiled, all inside one CUDA graph per token,
        and a CUDA-graphed prefill. CFM estimator: bf16 + CUDA graphs over
        bucketed lengths. CAMPPlus and the voice encoder: fp32, one CUDA graph per reference length
        (preparing a voice is launch-bound: 84 -> 20 ms, eval/results/h100-profile-conds-graphs.json).
        channels_last is off everywhere: on HiFT it measured slower (patches/04).
        The S3 tokenizer runs in fp16 (0.25 GB less resident; on the 10 s synthetic reference T3's
        prompt tokens are unchanged and 1 of S3Gen's 250 differs; bf16 changes 8 % of T3's:
        eval/results/h100-tokenizer-dtype.json, patches/15); the flow encoder stays fp32. Stop
        checks every 4 tokens, read one block late by the graphed decode (no GPU stall).
        """
        return cls(
            s3tokenizer=ComponentOpt(dtype="float16"),
            t3=ComponentOpt(dtype="bfloat16", cuda_graphs=True, compile="default"),
            cfm_estimator=ComponentOpt(dtype="bfloat16", cuda_graphs=True),
            campplus=ComponentOpt(cuda_graphs=True),
            voice_encoder=ComponentOpt(cuda_graphs=True),
            autograd_mode="inference_mode",
            attention_backend="sdpa",
            stop_check_every=4,
            t3_fused_decode=True,
            t3_gemv=True,
            t3_decode_attention=True,
            t3_gemv_fusion=True,
        )

    @classmethod
    def cpu(cls) -> "OptConfig":
        """The best configuration measured on 2 CPU cores (eval/results/cpu-ab.json, patches/14).

        fp32 everywhere (the CPU measured lacks 16-bit arithmetic: bf16/fp16 T3 decoded 2x slower,
        eval/results/cpu-t3-dtype.json),
        the CFM estimator's convolutions channels_last (its 10 calls are most of S3Gen's time on a
        CPU). T3 is memory-bound at ~0.3-0.4 s/token; nothing here changes its numbers.
        """
        return cls(cfm_estimator=ComponentOpt(channels_last=True))

    @classmethod
    def from_name(cls, name: str) -> "OptConfig":
        """A named preset: ``"reference"``, ``"fast"`` (GPU) or ``"cpu"``."""
        if name == "reference":
            return cls.reference()
        if name == "fast":
            return cls.fast()
        if name == "cpu":
            return cls.cpu()
        raise ValueError(f"unknown OptConfig preset {name!r}; known: {PRESETS} "
                         "(use OptConfig.parse for 'preset+field=value' specs)")

    @classmethod
    def parse(cls, spec: str) -> "OptConfig":
        """``"[preset][+component.field=value|+field=value]..."``; the preset defaults to reference.

        Component fields: ``dtype`` (float32|bfloat16|float16, or fp32/bf16/fp16), ``channels_last``
        and ``cuda_graphs`` (1/0, true/false, on/off), ``compile`` (a torch.compile mode, or none),
        ``quantize`` (int8_dynamic, or int8; none: off; T3 on the CPU only).
        Global fields: ``autograd_mode``, ``cfm_steps``, ``attention_backend``, ``stop_check_every``,
        ``cfm_bucket_frames``; ``t3_fused_decode``, ``t3_gemv``, ``t3_decode_attention``,
        ``t3_gemv_fusion``, ``t3_batching``, ``s3gen_scheduling`` (booleans).
        """
        if not isinstance(spec, str):
            raise TypeError(f"an OptConfig spec is a str, got {type(spec).__name__}")
        parts = [p.strip() for p in spec.strip().split(_SPEC_SEPARATOR)]
        if any(not p for p in parts):
            raise ValueError(f"empty item in OptConfig spec {spec!r}")
        opt = cls.reference()
        if "=" not in parts[0]:
            opt = cls.from_name(parts[0])
            parts = parts[1:]
        # Every item is read first and the config is built (and validated) once, so the order of the
        # items does not matter (``t3.cuda_graphs=1`` may come before the flags it needs).
        fields: dict = {}
        components: dict[str, dict] = {}
        for item in parts:
            if "=" not in item:
                raise ValueError(f"OptConfig spec item {item!r} is not 'field=value' (a preset may only come first)")
            key, value = (s.strip() for s in item.split("=", 1))
            if "." in key:
                comp, fname = key.split(".", 1)
                if comp not in COMPONENTS:
                    raise ValueError(f"unknown component {comp!r} in {key!r}; known: {COMPONENTS}")
                components.setdefault(comp, {})[fname] = _component_value(fname, value)
            else:
                fields[key] = _global_value(key, value)
        for comp, changes in components.items():
            known = {f.name for f in dataclasses.fields(ComponentOpt)}
            unknown = sorted(set(changes) - known)
            if unknown:
                raise ValueError(f"unknown component field(s) {unknown}; known: {sorted(known)}")
            fields[comp] = dataclasses.replace(getattr(opt, comp), **changes)
        return dataclasses.replace(opt, **fields)

    def to_spec(self) -> str:
        """The shortest ``reference+...`` spec that ``parse`` turns back into this config."""
        base = OptConfig.reference()
        items = []
        for name in COMPONENTS:
            comp, ref = getattr(self, name), getattr(base, name)
            for f in dataclasses.fields(ComponentOpt):
                value = getattr(comp, f.name)
                if value != getattr(ref, f.name):
                    text = (str(int(value)) if isinstance(value, bool)
                            else "none" if value is None else str(value))
                    items.append(f"{name}.{f.name}={text}")
        for f in dataclasses.fields(self):
            if f.name in COMPONENTS:
                continue
            value = getattr(self, f.name)
            if value != getattr(base, f.name):
                items.append(f"{f.name}={int(value) if isinstance(value, bool) else value}")
        return _SPEC_SEPARATOR.join(["reference", *items])

    # ------------------------------------------------------------------ edits
    def replace(self, **changes) -> "OptConfig":
        return dataclasses.replace(self, **changes)

    def with_component(self, name: str, **changes) -> "OptConfig":
        if name not in COMPONENTS:
            raise ValueError(f"unknown component {name!r}; known: {COMPONENTS}")
        known = {f.name for f in dataclasses.fields(ComponentOpt)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown component field(s) {unknown}; known: {sorted(known)}")
        return dataclasses.replace(self, **{name: dataclasses.replace(getattr(self, name), **changes)})

    def component(self, name: str) -> ComponentOpt:
        if name not in COMPONENTS:
            raise ValueError(f"unknown component {name!r}; known: {COMPONENTS}")
        return getattr(self, name)


def _global_value(key: str, value: str):
    if key in ("autograd_mode", "attention_backend"):
        return value
    if key in ("t3_fused_decode", "t3_gemv", "t3_decode_attention", "t3_gemv_fusion", "t3_batching",
               "s3gen_scheduling"):
        low = value.lower()
        if low not in _TRUE + _FALSE:
            raise ValueError(f"{key} needs a boolean (1/0, true/false, on/off), got {value!r}")
        return low in _TRUE
    if key in ("cfm_steps", "stop_check_every", "cfm_bucket_frames"):
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{key} needs an integer, got {value!r}") from None
    raise ValueError(f"unknown OptConfig field {key!r}")


def _component_value(fname: str, value: str):
    low = value.lower()
    if fname == "dtype":
        return _DTYPE_ALIASES.get(low, low)
    if fname in ("channels_last", "cuda_graphs"):
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"{fname} needs a boolean (1/0, true/false, on/off), got {value!r}")
    if fname == "compile":
        return None if low in _NO_COMPILE else value
    if fname == "quantize":
        return None if low in _NO_QUANTIZE else _QUANTIZE_ALIASES.get(low, low)
    raise ValueError(f"unknown component field {fname!r}; "
                     "known: dtype, channels_last, compile, cuda_graphs, quantize")


def _check_quantize(name: str, comp: ComponentOpt) -> None:
    """What a quantised component cannot be combined with (checked before any model is built)."""
    if name not in QUANTIZE_COMPONENTS:
        raise ValueError(f"{name} has no quantisation pass (supported: {QUANTIZE_COMPONENTS})")
    spec = f"{name}.quantize={comp.quantize}"
    if comp.dtype != "float32":
        raise ValueError(f"{spec} needs {name}.dtype=float32 (the int8 layers take and return float32), "
                         f"got {name}.dtype={comp.dtype}")
    if comp.cuda_graphs:
        raise ValueError(f"{spec} runs on the CPU only; {name}.cuda_graphs is for CUDA: turn one of them off")
    if comp.compile is not None:
        raise ValueError(f"{spec} cannot be combined with {name}.compile={comp.compile} "
                         "(the int8 layers run as eager CPU kernels)")
