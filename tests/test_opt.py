"""Optimisation settings and the runtime built from them: OptConfig specs, the one-shot passes
(``optim.passes``), the engine's own copy of the weights (``engine.materialize``), switching
configurations in any order (``ChatterboxTTS.set_opt`` / ``with_opt``), compile and CUDA-graph module
swaps (CPU: padding equivalence, delegation, error paths; GPU-marked tests capture for real).

Tolerances: float32 toggles (channels_last 4-D convolutions, attention backend, compile) must match
within 1e-5 * max(1, max|ref|); reduced precision must keep an SNR of >= 30 dB (bfloat16) or
>= 40 dB (float16) against float32 on these small random-weight models. Switching configurations is
exact: an engine built after any other one gives the outputs of a freshly loaded model.
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest
import torch

from chatterbox import ChatterboxTTS
from chatterbox.constants import S3GEN_SR
from chatterbox.engine import Engine
from chatterbox.engine.graph_modules import BucketedEstimator, GraphedForward
from chatterbox.engine.graphs import GraphRegistry
from chatterbox.engine.materialize import materialize
from chatterbox.optim.components import models_get
from chatterbox.engine.t3_runner import EagerT3Runner, GraphedT3Runner
from chatterbox.loader import Models, build_tiny_models
from chatterbox.models.s3gen.cfm import CausalCFM, CFMConfig
from chatterbox.models.s3gen.decoder import ConditionalDecoder, ConditionalDecoderConfig
from chatterbox.models.s3gen.source import SourceNoise
from chatterbox.models.t3.cond import T3Cond
from chatterbox.models.t3.t3 import T3Config
from chatterbox.nn.conv import Conv1d, ConvTranspose1d
from chatterbox.nn.cuda_graph import DISABLE_ENV, CudaGraph, GraphSignatureError
from chatterbox.opt import COMPONENTS as COMPAT_COMPONENTS
from chatterbox.opt import OptConfig as CompatOptConfig
from chatterbox.optim import ComponentOpt, OptConfig, apply_component_passes, apply_passes, attention_context
from chatterbox.optim.components import component_specs, find_components
from chatterbox.optim.config import COMPONENTS
from chatterbox.text import EnTokenizer
from chatterbox.text_vocab import write_tokenizer_json
from chatterbox.voice import synthetic_reference

ROOT = Path(__file__).resolve().parents[1]
FP32_RTOL = 1e-5
SNR_MIN = {"bfloat16": 30.0, "float16": 40.0}
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------- helpers
def snr_db(actual: torch.Tensor, expected: torch.Tensor) -> float:
    err = ((actual.double() - expected.double()) ** 2).sum()
    return float(10 * torch.log10((expected.double() ** 2).sum() / err.clamp_min(1e-300)))


def assert_fp32_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    tol = FP32_RTOL * max(1.0, float(expected.abs().max()))
    assert float((actual - expected).abs().max()) <= tol


def t3_inputs(cfg: T3Config) -> tuple[T3Cond, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    cond = T3Cond(speaker_emb=torch.randn(1, cfg.cond_enc.speaker_embed_size, generator=g),
                  cond_prompt_speech_tokens=torch.randint(0, 30, (1, 8), generator=g), emotion_adv=0.5)
    text = torch.tensor([[cfg.start_text_token, 3, 4, 5, 6, cfg.stop_text_token]] * 2)
    speech = torch.randint(0, 30, (2, 5), generator=g)
    return cond, text, speech


def component(models: Models, name: str) -> torch.nn.Module:
    return models_get(models, component_specs()[name].path)


def component_outputs(p: Models) -> dict[str, torch.Tensor]:
    """One float32 output per component of the tiny pipeline, on fixed float32 inputs."""
    g = torch.Generator().manual_seed(2)
    s3, flow, hift = p.s3gen, p.s3gen.flow, p.s3gen.mel2wav
    wav16 = 0.1 * torch.randn(16000, generator=g)
    mel = s3.tokenizer.log_mel(wav16[None])
    est = flow.decoder.estimator
    n_feats = est.cfg.n_feats
    frames = 24
    est_in = (torch.randn(2, n_feats, frames, generator=g), torch.ones(2, 1, frames),
              torch.randn(2, n_feats, frames, generator=g), torch.rand(2, generator=g),
              torch.randn(2, est.cfg.spk_dim, generator=g),
              torch.randn(2, n_feats, frames, generator=g))
    hift_mel = torch.randn(1, hift.cfg.n_mels, 12, generator=g)
    noise = SourceNoise.draw(1, 12 * hift.cfg.samples_per_frame, torch.Generator().manual_seed(3),
                             num_harmonics=hift.cfg.source.num_harmonics)
    cond, text, speech = t3_inputs(p.t3.cfg)
    with torch.inference_mode():
        return {
            "s3tokenizer": s3.tokenizer.encoder(mel, torch.tensor([mel.shape[-1]]))[0],
            "voice_encoder": p.ve(torch.randn(3, 160, 40, generator=g)),
            "campplus": s3.speaker_encoder.inference(wav16[None]),
            "t3": p.t3(cond, text, speech).speech_logits,
            "flow_encoder": flow.encoder(torch.randn(1, 10, flow.encoder.cfg.input_dim, generator=g)),
            "cfm_estimator": est(*est_in),
            "hift": hift(hift_mel, noise)[0],
        }


def state_snapshot(p: Models) -> dict[str, torch.Tensor]:
    out = {}
    for name in ("t3", "s3gen", "ve"):
        for k, v in getattr(p, name).state_dict().items():
            out[f"{name}.{k}"] = v.detach().clone()
    return out


def assert_same_state(p: Models, snapshot: dict[str, torch.Tensor]) -> None:
    now = state_snapshot(p)
    assert now.keys() == snapshot.keys()
    for k, v in snapshot.items():
        assert now[k].dtype == v.dtype and now[k].stride() == v.stride() and torch.equal(now[k], v), k


def assert_all_float32(p: Models) -> None:
    for name in ("t3", "s3gen", "ve"):
        for k, v in getattr(p, name).state_dict().items():
            assert not v.is_floating_point() or v.dtype == torch.float32, f"{name}.{k}"


@pytest.fixture(scope="module")
def weights() -> Models:
    """The float32 weights every engine copy in this module is made from (never changed)."""
    return build_tiny_models(0)


@pytest.fixture(scope="module")
def weights_snapshot(weights) -> dict[str, torch.Tensor]:
    return state_snapshot(weights)


@pytest.fixture(scope="module")
def reference_outputs(weights) -> dict[str, torch.Tensor]:
    return component_outputs(weights)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> EnTokenizer:
    return EnTokenizer(write_tokenizer_json(tmp_path_factory.mktemp("tok") / "tokenizer.json"))


# ---------------------------------------------------------------------------------------- OptConfig
def test_presets_and_names():
    ref, fast = OptConfig.reference(), OptConfig.fast()
    assert OptConfig.from_name("reference") == ref and OptConfig.from_name("fast") == fast
    assert all(getattr(ref, c).is_reference for c in COMPONENTS)
    assert fast.t3.dtype == "bfloat16" and fast.t3.cuda_graphs and fast.cfm_estimator.cuda_graphs
    assert fast.t3_fused_decode and fast.t3_gemv and fast.t3.compile == "default"
    assert fast.hift.is_reference  # channels_last measured slower on HiFT (patches/04)
    assert fast.t3_decode_attention and fast.t3_gemv_fusion and fast.s3tokenizer.dtype == "float16"
    cpu = OptConfig.from_name("cpu")
    assert cpu == OptConfig.parse("cpu") == OptConfig.cpu()
    assert cpu.cfm_estimator.channels_last and all(getattr(cpu, c).dtype == "float32" for c in COMPONENTS)
    assert not any(getattr(cpu, c).cuda_graphs for c in COMPONENTS)
    with pytest.raises(ValueError, match="unknown OptConfig preset"):
        OptConfig.from_name("turbo")


def test_compat_import_path_is_the_same_config():
    assert CompatOptConfig is OptConfig and COMPAT_COMPONENTS == COMPONENTS
    assert not hasattr(OptConfig(), "overlap_s3gen")


def test_parse_specs_aliases_and_round_trip():
    opt = OptConfig.parse("reference+t3.dtype=bf16+hift.channels_last=1+cfm_steps=6+autograd_mode=no_grad"
                          "+cfm_estimator.compile=max-autotune+attention_backend=math")
    assert opt.t3.dtype == "bfloat16" and opt.hift.channels_last and opt.cfm_steps == 6
    assert opt.autograd_mode == "no_grad" and opt.cfm_estimator.compile == "max-autotune"
    assert OptConfig.parse(opt.to_spec()) == opt
    assert OptConfig.parse("fast") == OptConfig.fast()
    assert OptConfig.parse(OptConfig.cpu().to_spec()) == OptConfig.cpu()
    assert OptConfig.parse("fast+t3.cuda_graphs=off").t3 == ComponentOpt(dtype="bfloat16", compile="default")
    assert OptConfig.parse("t3.dtype=fp16").t3.dtype == "float16"  # no preset: reference
    assert OptConfig.parse("reference+cfm_estimator.compile=none").cfm_estimator.compile is None
    assert OptConfig.reference().to_spec() == "reference"
    graphed = OptConfig.parse("reference+t3_fused_decode=1+t3_decode_attention=1+t3.cuda_graphs=1")
    assert graphed.t3.cuda_graphs and graphed.t3_decode_attention and graphed.t3_fused_decode


@pytest.mark.parametrize("opt", [OptConfig.fast(), OptConfig.reference().replace(
    t3_fused_decode=True, t3_decode_attention=True).with_component("t3", cuda_graphs=True)], ids=["fast", "graphed"])
def test_to_spec_round_trips_configs_with_a_graphed_t3(opt):
    assert OptConfig.parse(opt.to_spec()) == opt


def test_parse_does_not_depend_on_the_order_of_items():
    want = OptConfig.parse("reference+t3_fused_decode=1+t3_decode_attention=1+t3_gemv=1+t3.cuda_graphs=1")
    assert OptConfig.parse("reference+t3.cuda_graphs=1+t3_gemv=1+t3_decode_attention=1+t3_fused_decode=1") == want


@pytest.mark.parametrize("spec, match", [
    ("reference+t3.dtype=int8", "dtype"),
    ("reference+hift.channels_last=maybe", "boolean"),
    ("reference+vocoder.dtype=bf16", "unknown component"),
    ("reference+t3.colour=red", "unknown component field"),
    ("reference+cfm_steps=many", "integer"),
    ("reference+cfm_steps=0", "cfm_steps"),
    ("reference+speed=11", "unknown OptConfig field"),
    ("reference++t3.dtype=bf16", "empty item"),
    ("reference+fast", "preset may only come first"),
    ("reference+voice_encoder.channels_last=1", "no convolutions"),
    ("reference+hift.cuda_graphs=1", "no CUDA-graph runner"),
    ("reference+attention_backend=xformers", "attention_backend"),
    ("reference+autograd_mode=training", "autograd_mode"),
    ("reference+t3.cuda_graphs=1", "t3_decode_attention"),
    ("reference+t3_fused_decode=1+t3.cuda_graphs=1", "t3_decode_attention"),
    ("fast+t3_decode_attention=0", "t3_decode_attention"),
    ("reference+t3_gemv=1", "t3_fused_decode"),
    ("reference+t3_decode_attention=1", "t3_fused_decode"),
    ("reference+t3_gemv_fusion=1", "t3_fused_decode"),
    ("reference+overlap_s3gen=1", "unknown OptConfig field"),  # removed
])
def test_parse_errors_are_clear(spec, match):
    with pytest.raises(ValueError, match=match):
        OptConfig.parse(spec)


def test_t3_cuda_graphs_without_decode_attention_names_it():
    with pytest.raises(ValueError, match=r"t3\.cuda_graphs needs t3_decode_attention"):
        OptConfig.parse("reference+t3.cuda_graphs=1")


# ---------------------------------------------------------------------------------------- passes
def test_apply_passes_changes_modules_once_in_place_outside_inference_mode():
    p = build_tiny_models(6)
    norm = p.t3.tfmr.norm.weight
    conv_pre = p.s3gen.mel2wav.conv_pre
    modules_before = {id(m) for m in p.s3gen.modules()}
    opt = OptConfig.parse("t3.dtype=bf16+hift.channels_last=1")
    with torch.inference_mode():
        assert apply_passes(p.t3, opt) is p.t3
        assert apply_passes(p.s3gen, opt) is p.s3gen
    # in place: the same module and parameter objects, their data converted
    assert p.t3.tfmr.norm.weight is norm and norm.dtype == torch.bfloat16
    assert p.s3gen.mel2wav.conv_pre is conv_pre and conv_pre.run_as_4d and conv_pre.channels_last
    assert {id(m) for m in p.s3gen.modules()} == modules_before
    # outside inference mode: converted weights are ordinary tensors, editable in place later
    assert not norm.is_inference() and not conv_pre.weight.is_inference()
    norm.data.mul_(1)
    # once: applying the same passes again changes nothing (there is no undo and no re-application)
    ptrs = {k: v.data_ptr() for k, v in p.t3.state_dict().items()}
    apply_passes(p.t3, opt)
    assert {k: v.data_ptr() for k, v in p.t3.state_dict().items()} == ptrs
    # a reference config is a no-op: it does not restore float32
    apply_passes(p.t3, OptConfig.reference())
    assert norm.dtype == torch.bfloat16


def test_apply_passes_finds_components_in_any_module():
    p = build_tiny_models(7)
    found = dict(find_components(p.s3gen))
    assert set(found) == {"s3tokenizer", "campplus", "flow_encoder", "cfm_estimator", "hift"}
    apply_passes(p.s3gen.flow, OptConfig.parse("cfm_estimator.dtype=bf16+hift.dtype=bf16"))
    assert p.s3gen.flow.decoder.estimator.final_proj.weight.dtype == torch.bfloat16
    assert p.s3gen.mel2wav.conv_pre.weight.dtype == torch.float32  # not under the root given
    assert all(q.dtype == torch.float32 for q in p.s3gen.flow.encoder.parameters())
    with pytest.raises(TypeError, match="must be a"):
        apply_component_passes("hift", p.t3, ComponentOpt())


@pytest.mark.parametrize("name", ["s3tokenizer", "campplus", "flow_encoder", "cfm_estimator", "hift"])
def test_channels_last_matches_float32(weights, weights_snapshot, reference_outputs, name):
    m = materialize(weights, OptConfig.reference().with_component(name, channels_last=True), CPU)
    module = component(m, name)
    convs = [c for c in module.modules() if isinstance(c, (Conv1d, ConvTranspose1d))]
    assert convs and all(c.run_as_4d and c.channels_last for c in convs)
    assert all(c.weight.unsqueeze(2).is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert_fp32_close(component_outputs(m)[name], reference_outputs[name])
    assert state_snapshot(m).keys() == weights_snapshot.keys()
    # the weights the copy was made from are untouched
    original = [c for c in component(weights, name).modules() if isinstance(c, (Conv1d, ConvTranspose1d))]
    assert all("run_as_4d" not in c.__dict__ and c.weight.is_contiguous() for c in original)
    assert torch.equal(component_outputs(weights)[name], reference_outputs[name])
    assert_same_state(weights, weights_snapshot)


def test_campplus_head_conv2d_weights_go_channels_last(weights):
    m = materialize(weights, OptConfig.parse("campplus.channels_last=1"), CPU)
    convs2d = [c for c in m.s3gen.speaker_encoder.modules() if isinstance(c, torch.nn.Conv2d)]
    assert convs2d and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs2d)
    original = [c for c in weights.s3gen.speaker_encoder.modules() if isinstance(c, torch.nn.Conv2d)]
    assert all(c.weight.is_contiguous() for c in original)


@pytest.mark.parametrize("backend", ["math", "flash", "efficient"])
def test_attention_backend_matches_default(weights, reference_outputs, backend):
    with attention_context(backend):
        out = component_outputs(weights)
    for name in ("s3tokenizer", "t3", "flow_encoder", "cfm_estimator"):
        assert_fp32_close(out[name], reference_outputs[name])


def test_attention_backend_through_the_engine_matches_default(tiny_results, tokenizer, monkeypatch):
    import chatterbox.engine.engine as engine_module

    pinned = []

    def recording_context(backend):
        pinned.append(backend)
        return attention_context(backend)

    monkeypatch.setattr(engine_module, "attention_context", recording_context)
    tts = make_tts(tokenizer, "reference+attention_backend=math")
    assert tts.engine.opt.attention_backend == "math"
    res = _synth(tts)
    assert pinned and set(pinned) == {"math"}  # the request ran with the kernel pinned
    want = tiny_results["reference"]
    assert [t.tolist() for t in res.speech_tokens] == [t.tolist() for t in want.speech_tokens]
    assert_fp32_close(res.wav, want.wav)


def test_compile_swaps_the_component_from_outside_and_matches(weights, weights_snapshot, reference_outputs,
                                                              tokenizer, monkeypatch):
    # Dynamo traces for real; the eager backend skips Inductor's C++ build, which takes minutes on CPU.
    import chatterbox.engine.engine as engine_module

    calls = []
    real_compile = torch.compile

    def eager_compile(fn, **kwargs):
        calls.append(kwargs)
        return real_compile(fn, backend="eager")

    monkeypatch.setattr(engine_module.torch, "compile", eager_compile)
    est = weights.s3gen.flow.decoder.estimator
    keys = list(est.state_dict())
    engine = Engine.build(weights, tokenizer, OptConfig.parse("cfm_estimator.compile=reduce-overhead"), CPU)
    assert calls == [{"mode": "reduce-overhead"}]
    swapped = engine.components()["cfm_estimator"]
    assert engine.models.s3gen.flow.decoder.estimator is swapped
    assert swapped is not est and getattr(swapped, "_orig_mod", None) is not None
    assert swapped._orig_mod is not est  # the engine's own copy is compiled, never the weights
    assert "forward" not in est.__dict__ and list(est.state_dict()) == keys
    assert_fp32_close(component_outputs(engine.models)["cfm_estimator"], reference_outputs["cfm_estimator"])
    # T3 without the fused decode: its transformer is swapped for the compiled one
    calls.clear()
    engine = Engine.build(weights, tokenizer, OptConfig.parse("t3.compile=default"), CPU)
    assert calls == [{}] and engine.models.t3.tfmr._orig_mod is not weights.t3.tfmr
    assert weights.t3.tfmr is not engine.models.t3.tfmr
    assert_same_state(weights, weights_snapshot)


# ---------------------------------------------------------------------------------------- reduced precision
@pytest.mark.parametrize("name, dtype", [(c, "bfloat16") for c in COMPONENTS]
                         + [("cfm_estimator", "float16"), ("flow_encoder", "float16")])
def test_reduced_precision_keeps_snr_and_float32_interfaces(weights, reference_outputs, name, dtype):
    m = materialize(weights, OptConfig.reference().with_component(name, dtype=dtype), CPU)
    module = component(m, name)
    assert any(p.dtype == getattr(torch, dtype) for p in module.parameters())
    out = component_outputs(m)[name]
    assert out.dtype == torch.float32
    assert snr_db(out, reference_outputs[name]) >= SNR_MIN[dtype]
    assert all(p.dtype == torch.float32 for p in component(weights, name).parameters())
    assert torch.equal(component_outputs(weights)[name], reference_outputs[name])


def _assert_sensitive_parts(p: Models) -> None:
    assert p.t3.speech_head.weight.dtype == torch.float32 and p.t3.text_head.weight.dtype == torch.float32
    assert p.t3.tfmr.norm.weight.dtype == torch.bfloat16
    assert p.s3gen.mel2wav.m_source.l_linear.weight.dtype == torch.float32
    assert p.s3gen.mel2wav.f0_predictor.classifier.weight.dtype == torch.float32
    assert p.s3gen.mel2wav.conv_pre.weight.dtype == torch.bfloat16
    assert p.s3gen.tokenizer._mel_filters.dtype == torch.float32
    assert p.s3gen.tokenizer.quantizer._codebook.project_down.weight.dtype == torch.float32
    assert any(q.dtype == torch.bfloat16 for q in p.s3gen.tokenizer.encoder.parameters())


def test_numerically_sensitive_parts_stay_float32(weights):
    opt = OptConfig.parse("t3.dtype=bf16+hift.dtype=bf16+s3tokenizer.dtype=bf16")
    m = materialize(weights, opt, CPU)
    _assert_sensitive_parts(m)
    cond, text, _ = t3_inputs(m.t3.cfg)
    with torch.inference_mode():
        tokens = m.t3.inference(cond, text, 6, generator=torch.Generator().manual_seed(0))
    assert tokens.dtype == torch.long and tokens.shape[1] >= 1
    # the same split when the passes run on modules directly
    p = build_tiny_models(0)
    for root in (p.t3, p.s3gen, p.ve):
        apply_passes(root, opt)
    _assert_sensitive_parts(p)


# ---------------------------------------------------------------------------------------- materialize
def test_materialize_leaves_the_weights_bit_identical_and_shares_what_needs_no_change(weights, weights_snapshot):
    opt = OptConfig.parse("t3.dtype=bf16+cfm_estimator.channels_last=1+s3tokenizer.dtype=fp16")
    before = {id(v) for v in weights.t3.parameters()}
    m = materialize(weights, opt, CPU)
    assert_same_state(weights, weights_snapshot)
    assert_all_float32(weights)
    assert {id(v) for v in weights.t3.parameters()} == before
    assert m.t3 is not weights.t3 and m.s3gen is not weights.s3gen and m.ve is not weights.ve
    # the copy is lowered / channels_last ...
    assert m.t3.tfmr.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert m.t3.speech_head.weight.dtype == torch.float32
    assert all(q.dtype == torch.float16 for q in m.s3gen.tokenizer.encoder.parameters() if q.is_floating_point())
    est, est_w = m.s3gen.flow.decoder.estimator, weights.s3gen.flow.decoder.estimator
    convs = [c for c in est.modules() if isinstance(c, Conv1d)]
    assert convs and all(c.run_as_4d for c in convs)
    # ... every parameter of the copy is a new object, ordinary (not an inference tensor, no grad) ...
    w_params = dict(weights.s3gen.named_parameters())
    for k, q in m.s3gen.named_parameters():
        assert q is not w_params[k] and not q.requires_grad and not q.is_inference(), k
    # ... and tensors needing no change share the weights' storage (CPU -> CPU)
    shared = {"ve": (m.ve, weights.ve), "hift": (m.s3gen.mel2wav, weights.s3gen.mel2wav),
              "flow_encoder": (m.s3gen.flow.encoder, weights.s3gen.flow.encoder),
              "t3.speech_head": (m.t3.speech_head, weights.t3.speech_head)}
    for label, (copy_mod, w_mod) in shared.items():
        w_state = w_mod.state_dict()
        for k, v in copy_mod.state_dict().items():
            assert v.data_ptr() == w_state[k].data_ptr(), f"{label}.{k}"
    assert est.final_proj.weight.data_ptr() == est_w.final_proj.weight.data_ptr()  # a Linear: unchanged
    # re-laid-out convolution weights are new storage (a 1-wide kernel's layout is already channels_last)
    pairs = [(c, w) for c, w in zip(convs, [c for c in est_w.modules() if isinstance(c, Conv1d)])
             if w.weight.shape[-1] > 1]
    assert pairs and all(c.weight.data_ptr() != w.weight.data_ptr() for c, w in pairs)
    up, up_w = m.t3.tfmr.layers[0].mlp.up_proj.weight, weights.t3.tfmr.layers[0].mlp.up_proj.weight
    assert up.data_ptr() != up_w.data_ptr()
    # a reference copy costs no memory on the CPU: every tensor is shared
    ref = materialize(weights, OptConfig.reference(), CPU)
    for name in ("t3", "s3gen", "ve"):
        w_state = getattr(weights, name).state_dict()
        assert all(v.data_ptr() == w_state[k].data_ptr() for k, v in getattr(ref, name).state_dict().items())
    # using and editing the copy in place leaves the weights as they were
    component_outputs(m)
    with torch.no_grad():
        m.ve.proj.weight.data.mul_(1.0)
        m.t3.tfmr.layers[0].mlp.up_proj.weight.zero_()
    assert_same_state(weights, weights_snapshot)


# ---------------------------------------------------------------------------------------- switching
TEXT = "Hello there. How are you?"
SWITCH_SPECS = ["reference", "cpu", "reference+campplus.channels_last=1+hift.channels_last=1+cfm_steps=4",
                "reference+t3.dtype=bf16+cfm_estimator.dtype=bf16+s3tokenizer.dtype=fp16", "fast"]
WEIGHTS_SEED = 5


def make_tts(tokenizer: EnTokenizer, spec: str, models: Models | None = None) -> ChatterboxTTS:
    m = models or build_tiny_models(WEIGHTS_SEED)
    tts = ChatterboxTTS(m.t3, m.s3gen, m.ve, tokenizer, "cpu", opt=OptConfig.parse(spec))
    tts.prepare_conditionals(synthetic_reference(), sample_rate=S3GEN_SR)
    return tts


def _synth(tts: ChatterboxTTS):
    return tts.synthesize(TEXT, seed=3, max_new_tokens=16, watermark=False)


def assert_same_result(got, want, label) -> None:
    assert [t.tolist() for t in got.speech_tokens] == [t.tolist() for t in want.speech_tokens], label
    assert got.wav.shape == want.wav.shape and torch.equal(got.wav, want.wav), label


@pytest.fixture(scope="module")
def tiny_results(tokenizer) -> dict:
    """What a freshly loaded model gives under each configuration."""
    return {spec: _synth(make_tts(tokenizer, spec)) for spec in SWITCH_SPECS}


def test_fresh_results_are_real(tiny_results):
    ref = tiny_results["reference"]
    assert ref.wav.shape[1] > 0 and sum(t.numel() for t in ref.speech_tokens) > 0
    assert tiny_results["cpu"].wav.shape == ref.wav.shape
    # every configuration switched between below renders differently: a leftover of an earlier engine
    # (a lowered dtype, a channels_last layout, a step count) would show
    wavs = [tiny_results[spec].wav for spec in SWITCH_SPECS[:4]]
    assert all(not torch.equal(a, b) for i, a in enumerate(wavs) for b in wavs[i + 1:])


def test_set_opt_in_any_order_gives_what_a_fresh_model_gives(tokenizer, tiny_results):
    models = build_tiny_models(WEIGHTS_SEED)
    snapshot = state_snapshot(models)
    tts = make_tts(tokenizer, SWITCH_SPECS[0], models)
    # every ordered pair (A, B) of four configurations appears as consecutive switches
    order = [0, 1, 2, 3, 0, 2, 1, 3, 2, 0, 3, 1, 0]
    assert len({(a, b) for a, b in zip(order, order[1:])}) == 12
    for i in order:
        spec = SWITCH_SPECS[i]
        tts.set_opt(OptConfig.parse(spec))
        assert tts.opt == OptConfig.parse(spec)
        tts.prepare_conditionals(synthetic_reference(), sample_rate=S3GEN_SR)  # the voice of this engine
        assert_same_result(_synth(tts), tiny_results[spec], f"after switching to {spec}")
    assert_same_state(models, snapshot)
    assert_all_float32(models)
    assert tts._weights.t3 is models.t3


def test_fast_on_the_cpu_builds_an_eager_engine(tokenizer, tiny_results, caplog):
    models = build_tiny_models(WEIGHTS_SEED)
    snapshot = state_snapshot(models)
    tts = make_tts(tokenizer, "reference+t3.dtype=bf16", models)
    with caplog.at_level(logging.WARNING):
        tts.set_opt(OptConfig.fast())
    assert "needs a CUDA device" in caplog.text
    engine = tts.engine
    # On the CPU the CUDA-graph swaps are skipped with a warning, the rest applies: T3's fused decode
    # runs in the eager runner.
    assert not engine.graphs.enabled and len(engine.graphs) == 0
    assert isinstance(engine.t3_runner, EagerT3Runner) and engine.t3_runner.fused is not None
    assert not any(isinstance(m, (BucketedEstimator, GraphedForward)) for m in engine.components().values())
    assert tts.t3.tfmr.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    tts.prepare_conditionals(synthetic_reference(), sample_rate=S3GEN_SR)
    assert_same_result(_synth(tts), tiny_results["fast"], "fast")
    tts.set_opt(OptConfig.reference())
    assert tts.t3.tfmr.layers[0].mlp.up_proj.weight.dtype == torch.float32
    tts.prepare_conditionals(synthetic_reference(), sample_rate=S3GEN_SR)
    assert_same_result(_synth(tts), tiny_results["reference"], "reference after fast")
    assert_same_state(models, snapshot)


def test_with_opt_is_another_model_over_the_same_weights(tokenizer, tiny_results):
    models = build_tiny_models(WEIGHTS_SEED)
    snapshot = state_snapshot(models)
    tts = make_tts(tokenizer, "reference", models)
    spec = SWITCH_SPECS[3]
    other = tts.with_opt(OptConfig.parse(spec))
    assert other._weights is tts._weights and other.engine is not tts.engine
    assert tts.opt == OptConfig.reference() and other.opt == OptConfig.parse(spec)
    other.prepare_conditionals(synthetic_reference(), sample_rate=S3GEN_SR)
    assert_same_result(_synth(other), tiny_results[spec], spec)
    assert_same_result(_synth(tts), tiny_results["reference"], "reference beside it")
    assert_same_state(models, snapshot)


# ---------------------------------------------------------------------------------------- CUDA-graph wrapper
def test_cuda_graph_wrapper_disabled_runs_eagerly_with_the_same_contract():
    graph = CudaGraph(lambda a, b: a * 2 + b, name="axpy", enabled=False)
    x, y = torch.ones(3), torch.arange(3.0)
    assert torch.equal(graph(x, y), x * 2 + y) and not graph.captured
    with pytest.raises(GraphSignatureError, match="axpy.*\\[3\\] float32 cpu.*\\[4\\] float32 cpu"):
        graph(torch.ones(4), torch.ones(4))
    with pytest.raises(GraphSignatureError, match="float64"):
        graph(x.double(), y)
    with pytest.raises(TypeError, match="must be tensors"):
        graph(x, 2.0)
    graph.reset()
    assert torch.equal(graph(torch.ones(4), torch.ones(4)), torch.full((4,), 3.0))
    with pytest.raises(ValueError, match="warmup"):
        CudaGraph(lambda: None, warmup=0)


def test_cuda_graph_switch_off_by_environment(monkeypatch):
    monkeypatch.setenv(DISABLE_ENV, "1")
    assert not CudaGraph(lambda a: a, enabled=True).enabled
    assert not GraphRegistry(torch.device("cuda"), enabled=True).enabled
    monkeypatch.setenv(DISABLE_ENV, "0")
    assert CudaGraph(lambda a: a, enabled=True).enabled == torch.cuda.is_available()


def test_graph_registry_off_cuda_is_disabled_and_keeps_families():
    reg = GraphRegistry(CPU, enabled=True)
    assert not reg.enabled and reg.pool is None
    g1 = reg.get(("enc", (1, 4)), lambda a: a + 1, clone_outputs=True, limit=2)
    assert reg.get(("enc", (1, 4)), lambda a: a, clone_outputs=True) is g1  # one graph per key
    assert not g1.enabled and torch.equal(g1(torch.zeros(1, 4)), torch.ones(1, 4))
    for n in (5, 6):
        reg.get(("enc", (1, n)), lambda a: a, clone_outputs=True, limit=2)
    reg.get(("other", 1), lambda a: a, clone_outputs=False)
    assert reg.count("enc") == 2 and reg.count("other") == 1 and len(reg) == 3
    assert ("enc", (1, 4)) not in reg._graphs  # least recently used dropped first
    assert reg.captured() == []


# ---------------------------------------------------------------------------------------- CFM buckets
def _padded_path(monkeypatch) -> None:
    """Take the bucketed estimator's padded (graph) path on the CPU: the registry's graphs are disabled,
    so they run the padded call eagerly, exactly what a capture would record."""
    monkeypatch.setattr(BucketedEstimator, "_eager", lambda self, x: False)


def test_bucketed_estimator_with_disabled_graphs_is_the_estimator():
    torch.manual_seed(0)
    est = ConditionalDecoder(ConditionalDecoderConfig.small()).eval().requires_grad_(False)
    runner = BucketedEstimator(est, GraphRegistry(CPU, enabled=False), "cfm_estimator", 16)
    assert runner.cfg is est.cfg and runner.final_proj is est.final_proj  # other attributes delegate
    assert dict(runner.named_parameters()).keys() == {f"inner.{k}" for k, _ in est.named_parameters()}
    g = torch.Generator().manual_seed(9)
    c = est.cfg
    x, mu, cond = (torch.randn(2, c.n_feats, 21, generator=g) for _ in range(3))
    t, spks, mask = torch.rand(2, generator=g), torch.randn(2, c.spk_dim, generator=g), torch.ones(2, 1, 21)
    with torch.inference_mode():
        assert torch.equal(runner(x, mask, mu, t, spks, cond), est(x, mask, mu, t, spks, cond))
    assert len(runner.graphs) == 0
    with pytest.raises(ValueError, match="bucket_frames"):
        BucketedEstimator(est, GraphRegistry(CPU, enabled=False), "cfm_estimator", 0)


def test_padded_estimator_equals_unpadded_tiny_and_published(monkeypatch):
    _padded_path(monkeypatch)
    torch.manual_seed(0)
    tiny = ConditionalDecoder(ConditionalDecoderConfig.small()).eval().requires_grad_(False)
    with torch.device("meta"):
        big = ConditionalDecoder(ConditionalDecoderConfig.published())
    from chatterbox.synthetic import synth_state_dict

    big.load_state_dict(synth_state_dict(big.state_dict(), prefix="flow.decoder.estimator."), assign=True)
    big.eval().requires_grad_(False)
    for est, frames, bucket in ((tiny, 37, 64), (tiny, 64, 64), (big, 45, 64)):
        g = torch.Generator().manual_seed(frames)
        c = est.cfg
        x, mu, cond = (torch.randn(2, c.n_feats, frames, generator=g) for _ in range(3))
        t, spks = torch.rand(2, generator=g), torch.randn(2, c.spk_dim, generator=g)
        graphs = GraphRegistry(CPU, enabled=False)
        runner = BucketedEstimator(est, graphs, "cfm_estimator", bucket)
        with torch.inference_mode():
            want = est(x, torch.ones(2, 1, frames), mu, t, spks, cond)
            got = runner(x, None, mu, t, spks, cond)
        assert got.shape == want.shape
        assert float((got - want).abs().max()) <= 1e-5
        assert runner.padded_length(frames) % bucket == 0 and runner.padded_length(frames) >= frames
        # the padded call went through the registry, keyed by the bucketed shape
        assert graphs.count("cfm_estimator") == 1
        assert list(graphs._graphs)[0][1] == (2, c.n_feats, runner.padded_length(frames))


def test_cfm_with_the_bucketed_estimator_equals_the_plain_one(monkeypatch):
    _padded_path(monkeypatch)
    torch.manual_seed(1)
    cfm = CausalCFM(CFMConfig.small()).eval().requires_grad_(False)
    c = cfm.cfg.estimator
    g = torch.Generator().manual_seed(2)
    mu, cond, noise = (torch.randn(1, c.n_feats, 50, generator=g) for _ in range(3))
    spks, mask = torch.randn(1, c.spk_dim, generator=g), torch.ones(1, 1, 50)
    with torch.inference_mode():
        want = cfm(mu, mask, spks, cond, noise, n_timesteps=3)
        plain = cfm.estimator
        cfm.estimator = BucketedEstimator(plain, GraphRegistry(CPU, enabled=False), "cfm_estimator", 16)
        got = cfm(mu, mask, spks, cond, noise, n_timesteps=3)
    assert float((got - want).abs().max()) <= 1e-5


def test_graphed_forward_with_disabled_graphs_is_the_module_and_delegates(weights):
    camp = weights.s3gen.speaker_encoder
    graphs = GraphRegistry(CPU, enabled=False)
    wrapped = GraphedForward(camp, graphs, "campplus")
    g = torch.Generator().manual_seed(4)
    wav = 0.1 * torch.randn(1, 16000, generator=g)
    with torch.inference_mode():
        feats = wrapped.features(wav)  # delegated to CAMPPlus
        assert torch.equal(feats, camp.features(wav))
        assert torch.equal(wrapped(feats), camp(feats))
    assert wrapped.cfg is camp.cfg and wrapped.inner is camp and len(graphs) == 0


# ---------------------------------------------------------------------------------------- parity runner
def _parity_main():
    spec = importlib.util.spec_from_file_location("check_parity", ROOT / "scripts" / "check_parity.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def test_parity_runner_reports_deviation_under_an_opt(capsys):
    main = _parity_main()
    assert main(["--fixtures", str(ROOT / "tests" / "fixtures"), "--only", "hift", "--opt", "fast",
                 "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "hift/wav " in out and "snr=" in out and "# hift [reference+" in out and "t3.dtype=bfloat16" in out
    assert "parity[reference+" in out and " 0 deviate, 0 errors" in out  # fast keeps HiFT in float32
    assert main(["--fixtures", str(ROOT / "tests" / "fixtures"), "--only", "campplus", "--opt", "reference",
                 "--threads", "1"]) == 0
    assert "parity: 3 passed, 0 failed" in capsys.readouterr().out
    assert main(["--fixtures", str(ROOT / "tests" / "fixtures"), "--opt", "warp"]) == 2


# ---------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@gpu
def test_gpu_cuda_graph_captures_replays_and_rejects_new_shapes():
    calls = []

    def fn(a, b):
        calls.append(1)
        return a @ b + 1

    graph = CudaGraph(fn, name="mm")
    a, b = torch.randn(8, 8, device="cuda"), torch.randn(8, 8, device="cuda")
    assert torch.allclose(graph(a, b), a @ b + 1) and graph.captured
    n = len(calls)
    a2 = torch.randn(8, 8, device="cuda")
    assert torch.allclose(graph(a2, b), a2 @ b + 1) and len(calls) == n  # replayed, not re-run
    with pytest.raises(GraphSignatureError):
        graph(torch.randn(4, 8, device="cuda"), b)
    with torch.inference_mode():
        graph(a, b)
    out = graph(a, b)
    out *= 2  # a clone the caller owns


@pytest.mark.gpu
@gpu
def test_gpu_bucketed_estimator_graphs_equal_eager():
    m = materialize(build_tiny_models(3), OptConfig.parse("cfm_estimator.dtype=bf16"), torch.device("cuda"))
    est = m.s3gen.flow.decoder.estimator
    graphs = GraphRegistry(torch.device("cuda"), enabled=True)
    runner = BucketedEstimator(est, graphs, "cfm_estimator", 64)
    c = est.cfg
    x, mu, cond = (torch.randn(2, c.n_feats, 50, device="cuda") for _ in range(3))
    t, spks = torch.rand(2, device="cuda"), torch.randn(2, c.spk_dim, device="cuda")
    with torch.inference_mode():
        want = est(x, torch.ones(2, 1, 50, device="cuda"), mu, t, spks, cond)
        got = runner(x, None, mu, t, spks, cond)
        again = runner(x, None, mu, t, spks, cond)
    assert snr_db(got, want) >= SNR_MIN["bfloat16"] and torch.equal(got, again)
    assert graphs.count("cfm_estimator") == 1 and len(graphs.captured()) == 1


@pytest.mark.gpu
@gpu
def test_gpu_fast_engine_builds_and_synthesizes(tokenizer):
    models = build_tiny_models(WEIGHTS_SEED)
    snapshot = state_snapshot(models)
    tts = ChatterboxTTS(models.t3, models.s3gen, models.ve, tokenizer, "cuda", opt=OptConfig.fast())
    engine = tts.engine
    assert all(q.device.type == "cuda" for q in tts.t3.parameters())
    assert all(q.device.type == "cpu" for q in models.t3.parameters())  # the weights stay where they were
    assert engine.graphs.enabled and isinstance(engine.t3_runner, GraphedT3Runner)
    parts = engine.components()
    assert isinstance(parts["cfm_estimator"], BucketedEstimator)
    assert isinstance(parts["campplus"], GraphedForward) and isinstance(parts["voice_encoder"], GraphedForward)
    tts.prepare_conditionals(synthetic_reference(), sample_rate=S3GEN_SR)
    first = tts.synthesize(TEXT, seed=3, max_new_tokens=32, watermark=False)
    again = tts.synthesize(TEXT, seed=3, max_new_tokens=32, watermark=False)
    assert first.wav.shape[1] > 0 and first.wav.device.type == "cpu" and torch.isfinite(first.wav).all()
    assert [t.tolist() for t in first.speech_tokens] == [t.tolist() for t in again.speech_tokens]
    assert len(engine.graphs.captured()) > 0
    chunks = [c for c, _ in tts.generate_stream(TEXT, seed=3, max_new_tokens=32, chunk_size=8,
                                                print_metrics=False, watermark=False)]
    assert chunks and all(c.device.type == "cpu" for c in chunks)
    tts.set_opt(OptConfig.reference())
    assert tts.t3.tfmr.layers[0].mlp.up_proj.weight.dtype == torch.float32
    assert_same_state(models, snapshot)
