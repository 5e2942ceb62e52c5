"""Optimisation toggles: OptConfig specs, each pass on vs off, switching configurations in any order,
the CUDA-graph wrapper and runners (CPU: padding equivalence, eager runner logic, error paths;
GPU-marked tests capture for real).

Tolerances: float32 toggles (channels_last 4-D convolutions, attention backend, compile) must match
within 1e-5 * max(1, max|ref|); reduced precision must keep an SNR of >= 30 dB (bfloat16) or
>= 40 dB (float16) against float32 on these small random-weight models.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from chatterbox import passes
from chatterbox.graphed import BucketedEstimator, T3GraphDecoder, race_draw
from chatterbox.models.s3gen.cfm import CausalCFM, CFMConfig
from chatterbox.models.s3gen.decoder import ConditionalDecoder, ConditionalDecoderConfig
from chatterbox.models.s3gen.flow import FlowConfig
from chatterbox.models.s3gen.hift import HiFTConfig, fold_weight_norm
from chatterbox.models.s3gen.s3gen import S3Gen, S3GenConfig
from chatterbox.models.s3gen.source import SourceNoise
from chatterbox.models.s3gen.xvector import CAMPPlusConfig
from chatterbox.models.s3tokenizer import S3TokenizerConfig
from chatterbox.models.t3.cond import T3Cond
from chatterbox.models.t3.t3 import T3, T3Config
from chatterbox.models.voice_encoder import VoiceEncoder, VoiceEncoderConfig
from chatterbox.nn.conv import Conv1d, ConvTranspose1d
from chatterbox.nn.cuda_graph import DISABLE_ENV, CudaGraph, GraphSignatureError
from chatterbox.opt import COMPONENTS, ComponentOpt, OptConfig
from chatterbox.passes import OptState, apply_opt, apply_to_components, pipeline_components, reset_components

ROOT = Path(__file__).resolve().parents[1]
FP32_RTOL = 1e-5
SNR_MIN = {"bfloat16": 30.0, "float16": 40.0}
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These models are tiny: extra threads only add contention on a shared CPU.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------- helpers
def snr_db(actual: torch.Tensor, expected: torch.Tensor) -> float:
    err = ((actual.double() - expected.double()) ** 2).sum()
    return float(10 * torch.log10((expected.double() ** 2).sum() / err.clamp_min(1e-300)))


def assert_fp32_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    tol = FP32_RTOL * max(1.0, float(expected.abs().max()))
    assert float((actual - expected).abs().max()) <= tol


def tiny_pipeline(seed: int = 0) -> SimpleNamespace:
    torch.manual_seed(seed)
    cfg = S3GenConfig(tokenizer=S3TokenizerConfig.tiny(), speaker_encoder=CAMPPlusConfig.tiny(),
                      flow=FlowConfig.tiny(), hift=HiFTConfig.tiny())
    s3gen, t3, ve = S3Gen(cfg), T3(T3Config.tiny()), VoiceEncoder(VoiceEncoderConfig.tiny())
    fold_weight_norm(s3gen.mel2wav)
    for m in (s3gen, t3, ve):
        m.eval().requires_grad_(False)
    return SimpleNamespace(t3=t3, s3gen=s3gen, ve=ve)


def t3_inputs(cfg: T3Config) -> tuple[T3Cond, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    cond = T3Cond(speaker_emb=torch.randn(1, cfg.cond_enc.speaker_embed_size, generator=g),
                  cond_prompt_speech_tokens=torch.randint(0, 30, (1, 8), generator=g), emotion_adv=0.5)
    text = torch.tensor([[cfg.start_text_token, 3, 4, 5, 6, cfg.stop_text_token]] * 2)
    speech = torch.randint(0, 30, (2, 5), generator=g)
    return cond, text, speech


def component_outputs(p: SimpleNamespace) -> dict[str, torch.Tensor]:
    """One float32 output per component of the tiny pipeline, on fixed inputs."""
    g = torch.Generator().manual_seed(2)
    s3, flow, hift = p.s3gen, p.s3gen.flow, p.s3gen.mel2wav
    wav16 = 0.1 * torch.randn(16000, generator=g)
    mel = s3.tokenizer.log_mel(wav16[None])
    n_feats = flow.decoder.estimator.cfg.n_feats
    frames = 24
    est_in = (torch.randn(2, n_feats, frames, generator=g), torch.ones(2, 1, frames),
              torch.randn(2, n_feats, frames, generator=g), torch.rand(2, generator=g),
              torch.randn(2, flow.decoder.estimator.cfg.spk_dim, generator=g),
              torch.randn(2, n_feats, frames, generator=g))
    hift_mel = torch.randn(1, hift.cfg.n_mels, 12, generator=g)
    noise = SourceNoise.draw(1, 12 * hift.cfg.samples_per_frame, torch.Generator().manual_seed(3),
                             num_harmonics=hift.cfg.source.num_harmonics)
    cond, text, speech = t3_inputs(p.t3.cfg)
    return {
        "s3tokenizer": s3.tokenizer.encoder(mel, torch.tensor([mel.shape[-1]]))[0],
        "voice_encoder": p.ve(torch.randn(3, 160, 40, generator=g)),
        "campplus": s3.speaker_encoder.inference(wav16[None]),
        "t3": p.t3(cond, text, speech).speech_logits,
        "flow_encoder": flow.encoder(torch.randn(1, 10, flow.encoder.cfg.input_dim, generator=g)),
        "cfm_estimator": flow.decoder.estimator(*est_in),
        "hift": hift(hift_mel, noise)[0],
    }


def snapshot(p: SimpleNamespace) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in (("t3", p.t3), ("s3gen", p.s3gen), ("ve", p.ve)):
        for k, v in m.state_dict().items():
            out[f"{name}.{k}"] = v.clone()
    return out


@pytest.fixture(scope="module")
def pipe() -> SimpleNamespace:
    return tiny_pipeline()


@pytest.fixture(scope="module")
def reference_outputs(pipe) -> dict[str, torch.Tensor]:
    return component_outputs(pipe)


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


def test_parse_specs_aliases_and_round_trip():
    opt = OptConfig.parse("reference+t3.dtype=bf16+hift.channels_last=1+cfm_steps=6+autograd_mode=no_grad"
                          "+cfm_estimator.compile=max-autotune+attention_backend=math")
    assert opt.t3.dtype == "bfloat16" and opt.hift.channels_last and opt.cfm_steps == 6
    assert opt.autograd_mode == "no_grad" and opt.cfm_estimator.compile == "max-autotune"
    assert OptConfig.parse(opt.to_spec()) == opt
    assert OptConfig.parse("fast") == OptConfig.fast()
    assert OptConfig.parse("fast+t3.cuda_graphs=off").t3 == ComponentOpt(dtype="bfloat16", compile="default")
    assert OptConfig.parse("t3.dtype=fp16").t3.dtype == "float16"  # no preset: reference
    assert OptConfig.parse("reference+cfm_estimator.compile=none").cfm_estimator.compile is None
    assert OptConfig.reference().to_spec() == "reference"


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
])
def test_parse_errors_are_clear(spec, match):
    with pytest.raises(ValueError, match=match):
        OptConfig.parse(spec)


# ---------------------------------------------------------------------------------------- float32 toggles
@pytest.mark.parametrize("name", ["s3tokenizer", "campplus", "flow_encoder", "cfm_estimator", "hift"])
def test_channels_last_matches_float32_and_resets_exactly(pipe, reference_outputs, name):
    before = snapshot(pipe)
    state = apply_opt(pipe, OptConfig.reference().with_component(name, channels_last=True))
    module = pipeline_components(pipe)[name]
    convs = [m for m in module.modules() if isinstance(m, (Conv1d, ConvTranspose1d))]
    assert convs and all(c.run_as_4d and c.channels_last for c in convs)
    assert all(c.weight.unsqueeze(2).is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert_fp32_close(component_outputs(pipe)[name], reference_outputs[name])
    assert snapshot(pipe).keys() == before.keys()
    apply_opt(pipe, OptConfig.reference())
    assert state.applied[name].plan.comp.is_reference
    assert all("run_as_4d" not in c.__dict__ and c.weight.is_contiguous() for c in convs)
    assert torch.equal(component_outputs(pipe)[name], reference_outputs[name])


def test_campplus_head_conv2d_weights_go_channels_last(pipe):
    apply_opt(pipe, OptConfig.parse("campplus.channels_last=1"))
    convs2d = [m for m in pipe.s3gen.speaker_encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs2d and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs2d)
    apply_opt(pipe, OptConfig.reference())
    assert all(c.weight.is_contiguous() for c in convs2d)


@pytest.mark.parametrize("backend", ["math", "flash", "efficient"])
def test_attention_backend_matches_default(pipe, reference_outputs, backend):
    apply_opt(pipe, OptConfig.reference().replace(attention_backend=backend))
    assert passes.is_wrapped(pipe.t3, "decode_step") and passes.is_wrapped(pipe.s3gen.flow.encoder, "forward")
    out = component_outputs(pipe)
    for name in ("s3tokenizer", "t3", "flow_encoder", "cfm_estimator"):
        assert_fp32_close(out[name], reference_outputs[name])
    apply_opt(pipe, OptConfig.reference())
    assert not passes.is_wrapped(pipe.t3, "decode_step")


def test_compile_wraps_from_outside_and_matches(pipe, reference_outputs, monkeypatch):
    # Dynamo traces for real; the eager backend skips Inductor's C++ build, which takes minutes on CPU.
    calls = []
    real_compile = torch.compile

    def eager_compile(fn, **kwargs):
        calls.append(kwargs)
        return real_compile(fn, backend="eager")

    monkeypatch.setattr(passes.torch, "compile", eager_compile)
    est = pipe.s3gen.flow.decoder.estimator
    keys = list(est.state_dict())
    apply_opt(pipe, OptConfig.parse("cfm_estimator.compile=reduce-overhead"))
    assert calls == [{"mode": "reduce-overhead"}] and passes.is_wrapped(est, "forward")
    assert list(est.state_dict()) == keys
    assert_fp32_close(component_outputs(pipe)["cfm_estimator"], reference_outputs["cfm_estimator"])
    apply_opt(pipe, OptConfig.reference())
    assert "forward" not in est.__dict__


# ---------------------------------------------------------------------------------------- reduced precision
@pytest.mark.parametrize("name, dtype", [(c, "bfloat16") for c in COMPONENTS]
                         + [("cfm_estimator", "float16"), ("flow_encoder", "float16")])
def test_reduced_precision_keeps_snr_and_float32_interfaces(pipe, reference_outputs, name, dtype):
    state = apply_opt(pipe, OptConfig.reference().with_component(name, dtype=dtype))
    module = pipeline_components(pipe)[name]
    assert any(p.dtype == getattr(torch, dtype) for p in module.parameters())
    assert state.backup_bytes() > 0
    out = component_outputs(pipe)[name]
    assert out.dtype == torch.float32
    assert snr_db(out, reference_outputs[name]) >= SNR_MIN[dtype]
    apply_opt(pipe, OptConfig.reference())
    assert state.backup_bytes() == 0
    assert torch.equal(component_outputs(pipe)[name], reference_outputs[name])


def test_numerically_sensitive_parts_stay_float32(pipe):
    apply_opt(pipe, OptConfig.parse("t3.dtype=bf16+hift.dtype=bf16+s3tokenizer.dtype=bf16"))
    try:
        assert pipe.t3.speech_head.weight.dtype == torch.float32 and pipe.t3.tfmr.norm.weight.dtype == torch.bfloat16
        assert pipe.s3gen.mel2wav.m_source.l_linear.weight.dtype == torch.float32
        assert pipe.s3gen.mel2wav.f0_predictor.classifier.weight.dtype == torch.float32
        assert pipe.s3gen.mel2wav.conv_pre.weight.dtype == torch.bfloat16
        assert pipe.s3gen.tokenizer._mel_filters.dtype == torch.float32
        assert pipe.s3gen.tokenizer.quantizer._codebook.project_down.weight.dtype == torch.float32
        cond, text, _ = t3_inputs(pipe.t3.cfg)
        tokens = pipe.t3.inference(cond, text, 6, generator=torch.Generator().manual_seed(0))
        assert tokens.dtype == torch.long and tokens.shape[1] >= 1
    finally:
        apply_opt(pipe, OptConfig.reference())


# ---------------------------------------------------------------------------------------- switching
def test_switching_configurations_in_any_order_restores_float32_exactly(caplog):
    p = tiny_pipeline(seed=5)
    original = snapshot(p)
    outputs = component_outputs(p)
    sequence = ["fast", "reference", "reference+t3.dtype=bf16", "fast+hift.dtype=fp16",
                "reference+hift.channels_last=1+cfm_estimator.dtype=bf16", "fast", "reference"]
    for spec in sequence:
        state = apply_opt(p, OptConfig.parse(spec))
        assert p.opt_state is state and state.opt == OptConfig.parse(spec)
        if spec == "fast":
            # On the CPU the CUDA-graph runners are skipped with a warning, the rest applies: T3's
            # fused decode runs eagerly in an ungraphed runner.
            assert state.cfm_estimator is None
            assert state.t3_decoder is not None and state.t3_decoder.enabled is False and state.t3_decoder.fused
            assert "needs a CUDA device" in caplog.text
            weight = p.t3.tfmr.layers[0].mlp.up_proj.weight
            assert weight.dtype == torch.bfloat16
            lowered = weight.data
            apply_opt(p, OptConfig.parse(spec))  # unchanged settings: nothing is redone
            assert p.t3.tfmr.layers[0].mlp.up_proj.weight.data_ptr() == lowered.data_ptr()
    final = snapshot(p)
    assert final.keys() == original.keys()
    for k, v in original.items():
        assert final[k].dtype == v.dtype and torch.equal(final[k], v), k
    after = component_outputs(p)
    for name in COMPONENTS:
        assert torch.equal(after[name], outputs[name]), name
    for m in (p.t3, p.s3gen, p.ve):
        for sub in m.modules():
            assert not any(getattr(v, "__chatterbox_pass__", False) for v in sub.__dict__.values())
    assert p.opt_state.backup_bytes() == 0


def test_passes_run_outside_inference_mode():
    p = tiny_pipeline(seed=6)
    with torch.inference_mode():
        apply_opt(p, OptConfig.parse("t3.dtype=bf16+hift.channels_last=1"))
    assert not p.t3.tfmr.norm.weight.is_inference()
    assert not p.s3gen.mel2wav.conv_pre.weight.is_inference()
    apply_opt(p, OptConfig.reference())
    p.t3.tfmr.norm.weight.data.mul_(1)  # an in-place edit outside inference mode still works


def test_apply_to_components_finds_components_in_any_module():
    p = tiny_pipeline(seed=7)
    found = dict(passes.find_components(p.s3gen))
    assert set(found) == {"s3tokenizer", "campplus", "flow_encoder", "cfm_estimator", "hift"}
    state = apply_to_components(passes.find_components(p.s3gen.flow), OptConfig.parse("cfm_estimator.dtype=bf16"))
    assert p.s3gen.flow.decoder.estimator.final_proj.weight.dtype == torch.bfloat16
    reset_components(state)
    assert p.s3gen.flow.decoder.estimator.final_proj.weight.dtype == torch.float32
    with pytest.raises(TypeError, match="must be a"):
        apply_to_components([("hift", p.t3)], OptConfig.reference())
    with pytest.raises(TypeError, match="OptConfig"):
        apply_opt(p, "fast")


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
    monkeypatch.setenv(DISABLE_ENV, "0")
    assert CudaGraph(lambda a: a, enabled=True).enabled == torch.cuda.is_available()


def test_race_draw_is_multinomial():
    g = torch.Generator().manual_seed(0)
    for seed in range(30):
        probs = torch.softmax(3 * torch.randn(2, 500, generator=g), dim=-1)
        a, b = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        assert torch.equal(torch.multinomial(probs, 1, generator=a), race_draw(probs, b))
        assert torch.equal(a.get_state(), b.get_state())


# ---------------------------------------------------------------------------------------- CFM buckets
def test_padded_estimator_equals_unpadded_tiny_and_published():
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
        runner = BucketedEstimator(est, bucket)
        with torch.inference_mode():
            want = est(x, torch.ones(2, 1, frames), mu, t, spks, cond)
            got = runner(x, None, mu, t, spks, cond)
        assert got.shape == want.shape
        assert float((got - want).abs().max()) <= 1e-5
        assert runner.padded_length(frames) % bucket == 0


def test_cfm_with_the_bucketed_estimator_equals_the_plain_one():
    torch.manual_seed(1)
    cfm = CausalCFM(CFMConfig.small()).eval().requires_grad_(False)
    c = cfm.cfg.estimator
    g = torch.Generator().manual_seed(2)
    mu, cond, noise = (torch.randn(1, c.n_feats, 50, generator=g) for _ in range(3))
    spks, mask = torch.randn(1, c.spk_dim, generator=g), torch.ones(1, 1, 50)
    want = cfm(mu, mask, spks, cond, noise, n_timesteps=3)
    got = cfm(mu, mask, spks, cond, noise, n_timesteps=3, estimator=BucketedEstimator(cfm.estimator, 16))
    assert float((got - want).abs().max()) <= 1e-5


# ---------------------------------------------------------------------------------------- T3 decoder
def tiny_t3(seed: int = 0) -> T3:
    torch.manual_seed(seed)
    t3 = T3(T3Config.tiny())
    for p in t3.parameters():
        p.data.normal_(0, 0.3)  # peaky enough that sampling has something to choose
    return t3.eval().requires_grad_(False)


def test_t3_graph_decoder_runs_the_eager_loop_when_not_captured():
    t3 = tiny_t3()
    cond, text, _ = t3_inputs(t3.cfg)
    decoder = T3GraphDecoder(t3, window=8)
    for seed, mode in zip(range(4), ("inference_mode", "no_grad", "none", "inference_mode")):
        g_eager, g_dec = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        with torch.inference_mode():
            want = t3.inference(cond, text, 25, generator=g_eager, top_p=0.9, min_p=0.05, stop_check_every=4)
        ctx = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad}.get(mode)
        with (ctx() if ctx else torch.enable_grad()):
            got = t3.inference(cond, text, 25, generator=g_dec, top_p=0.9, min_p=0.05, stop_check_every=4,
                               decoder=decoder)
        assert got.tolist() == want.tolist()
        assert torch.equal(g_eager.get_state(), g_dec.get_state())
        assert not got.is_inference() or mode == "inference_mode"


def test_t3_graph_decoder_errors():
    t3 = tiny_t3()
    cond, text, _ = t3_inputs(t3.cfg)
    decoder = T3GraphDecoder(t3, window=8)
    with pytest.raises(ValueError, match="owns its cache"):
        t3.inference(cond, text, 5, forced_tokens=torch.ones(1, 5, dtype=torch.long), decoder=decoder)
    with pytest.raises(ValueError, match="another T3"):
        tiny_t3(1).inference(cond, text, 5, decoder=decoder)
    first = t3.generate_tokens(cond, text, 20, block_size=1, decoder=decoder, top_p=1.0)
    next(first)
    list(t3.generate_tokens(cond, text, 3, decoder=decoder))  # a second generation takes over
    with pytest.raises(RuntimeError, match="one generation at a time"):
        next(first)
    with pytest.raises(RuntimeError, match="call cache"):
        next(T3GraphDecoder(t3).tokens(torch.zeros(2, 40), torch.zeros(1, 40, dtype=torch.bool), 5, None, None, 3))


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
def test_gpu_race_draw_is_multinomial_on_cuda():
    probs = torch.softmax(3 * torch.randn(1, 8194, device="cuda"), dim=-1)
    for seed in range(10):
        a, b = torch.Generator("cuda").manual_seed(seed), torch.Generator("cuda").manual_seed(seed)
        assert torch.equal(torch.multinomial(probs, 1, generator=a), race_draw(probs, b))
        assert torch.equal(a.get_state(), b.get_state())


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_t3_graph_decoder_matches_the_eager_loop(dtype):
    t3 = tiny_t3().cuda()
    if dtype != torch.float32:
        apply_to_components([("t3", t3)], OptConfig.reference().with_component("t3", dtype="bfloat16"))
    cond, text, _ = t3_inputs(t3.cfg)
    cond, text = cond.to("cuda"), text.cuda()
    decoder = T3GraphDecoder(t3, window=8)
    for seed in range(3):
        g1, g2 = torch.Generator("cuda").manual_seed(seed), torch.Generator("cuda").manual_seed(seed)
        with torch.inference_mode():
            want = t3.inference(cond, text, 30, generator=g1, top_p=0.9)
            got = t3.inference(cond, text, 30, generator=g2, top_p=0.9, decoder=decoder)
        assert got.tolist() == want.tolist()
        assert torch.equal(g1.get_state(), g2.get_state())
    assert any(g.captured for g in decoder._graphs.values())
    got = t3.inference(cond, text, 30, generator=torch.Generator("cuda").manual_seed(0), top_p=0.9,
                       decoder=decoder)  # outside inference_mode, after capturing inside it
    assert got.shape[1] >= 1


@pytest.mark.gpu
@gpu
def test_gpu_bucketed_estimator_and_fast_pipeline():
    p = tiny_pipeline(seed=3)
    for m in (p.t3, p.s3gen, p.ve):
        m.cuda()
    state = apply_opt(p, OptConfig.fast())
    assert isinstance(state.t3_decoder, T3GraphDecoder) and isinstance(state.cfm_estimator, BucketedEstimator)
    est = p.s3gen.flow.decoder.estimator
    c = est.cfg
    x, mu, cond = (torch.randn(2, c.n_feats, 50, device="cuda") for _ in range(3))
    t, spks = torch.rand(2, device="cuda"), torch.randn(2, c.spk_dim, device="cuda")
    with torch.inference_mode():
        want = est(x, torch.ones(2, 1, 50, device="cuda"), mu, t, spks, cond)
        got = state.cfm_estimator(x, None, mu, t, spks, cond)
        again = state.cfm_estimator(x, None, mu, t, spks, cond)
    assert snr_db(got, want) >= SNR_MIN["bfloat16"] and torch.equal(got, again)
    assert any(g.captured for g in state.cfm_estimator._graphs.values())
    apply_opt(p, OptConfig.reference())
    assert p.opt_state.t3_decoder is None and est.final_proj.weight.dtype == torch.float32


def test_opt_state_is_exported():
    assert OptState().backup_bytes() == 0
