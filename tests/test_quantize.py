"""int8 dynamic quantisation of T3 on the CPU (``t3.quantize=int8_dynamic``, optim/quantize.py).

Tolerances, and why:

* One layer: every output is within the worst case of its rounding. Weights round by at most half a
  step of their row (``amax / 127``); activations, quantised per call over the whole tensor, by at
  most one step (``range / qmax``, with qmax 127 for 7-bit and 255 for 8-bit activations: a full step
  because the zero point is rounded too). So ``|y - y_fp32| <= step_w / 2 * sum|x| + step_x * sum|w|
  + K * step_x * step_w / 2`` for each output. A transposed or mis-scaled weight breaks it at once.
* The whole T3, teacher-forced (float32 logits of the same tokens as the reference): the relative
  error of each position's speech logits ``|l_q - l| / |l|`` stays within 0.10 with 7-bit
  activations and 0.06 with 8-bit ones (VNNI CPUs), and the top-1 id agrees on at least 85 % of the
  positions. Measured on these tiny models: at most 0.067 / 0.036 and 91-100 %. Full-size figures
  (Nano, original T3) and the KL divergence of the sampled distributions are in patches/18.
"""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_tts, make_tiny_turbo_tts
from torch import nn

from chatterbox.engine import SynthesisRequest
from chatterbox.loader import build_tiny_models
from chatterbox.loader_turbo import build_tiny_turbo_models
from chatterbox.models.t3.cond import T3Cond
from chatterbox.models.t3_turbo.gpt2 import Conv1D
from chatterbox.optim import ComponentOpt, OptConfig, apply_passes
from chatterbox.optim.passes import quantize_models
from chatterbox.optim.quantize import Int8DynamicConfig, Int8DynamicLinear, cpu_has_vnni, quantize_component

pytestmark = pytest.mark.usefixtures("one_thread")

INT8 = OptConfig.parse("cpu+t3.quantize=int8")
# (reduce_range, relative error bound of the logits)
REL_ERR_BOUND = {True: 0.10, False: 0.06}
TOP1_MIN = 0.85
# float32 rounding of the kernels' own sums, on top of the quantisation bound
FP32_SLACK = 1e-4
MAX_TOKENS = 12
TURBO_SILENCE = 3  # Turbo renders three silence codes after a segment's last chunk
RANGES = [True, pytest.param(False, marks=pytest.mark.skipif(
    not cpu_has_vnni(), reason="8-bit activations need VNNI (int32 sums) to be exact"))]


# ---------------------------------------------------------------------------------------- config
def test_spec_parsing_aliases_and_round_trip():
    assert INT8.t3.quantize == "int8_dynamic" and INT8.cfm_estimator.channels_last
    assert OptConfig.parse("cpu+t3.quantize=int8_dynamic") == INT8
    assert OptConfig.parse(INT8.to_spec()) == INT8
    assert OptConfig.parse("cpu+t3.quantize=INT8").t3.quantize == "int8_dynamic"
    for off in ("none", "off", "0", "false"):
        assert OptConfig.parse(f"cpu+t3.quantize=int8+t3.quantize={off}").t3.quantize is None
    assert OptConfig.reference().t3.quantize is None and OptConfig.fast().t3.quantize is None
    assert OptConfig.reference().with_component("t3", quantize="int8_dynamic").t3 == INT8.t3


@pytest.mark.parametrize("spec, match", [
    ("cpu+t3.quantize=int4", r"quantize must be one of .*'int4'"),
    ("cpu+t3.quantize=", r"quantize must be one of .*''"),
    ("cpu+hift.quantize=int8", r"hift has no quantisation pass \(supported: \('t3',\)\)"),
    ("cpu+t3.quantize=int8+t3.dtype=bf16", r"t3\.quantize=int8_dynamic needs t3\.dtype=float32.*bfloat16"),
    ("cpu+t3.quantize=int8+t3.compile=default", r"t3\.quantize=int8_dynamic cannot be combined with t3\.compile"),
    ("cpu+t3.quantize=int8+t3_fused_decode=1", r"t3\.quantize replaces .* t3_fused_decode packs"),
    ("fast+t3.quantize=int8", r"t3\.quantize=int8_dynamic"),
])
def test_bad_specs_name_the_problem(spec, match):
    with pytest.raises(ValueError, match=match):
        OptConfig.parse(spec)


def test_component_opt_names_a_bad_mode():
    with pytest.raises(ValueError, match=r"quantize must be one of .*'int8'"):
        ComponentOpt(quantize="int8")  # the alias is for specs; the field holds the mode's name


def test_weights_off_the_cpu_are_refused_with_the_device_named():
    t3 = build_tiny_turbo_models(0).t3.to("meta")
    with pytest.raises(ValueError, match=r"t3\.quantize=int8_dynamic runs on the CPU only.*meta"):
        quantize_component("t3", t3, "int8_dynamic")
    with pytest.raises(ValueError, match="CPU only.*meta"):
        Int8DynamicLinear(torch.empty(4, 3, device="meta"), None, Int8DynamicConfig())
    with pytest.raises(ValueError, match="hift has no quantisation pass"):
        quantize_component("hift", nn.Linear(2, 2), "int8_dynamic")
    with pytest.raises(ValueError, match="quantize mode must be one of"):
        quantize_component("t3", nn.Linear(2, 2), "int4")


# ---------------------------------------------------------------------------------------- one layer
def worst_case_error(x: torch.Tensor, w: torch.Tensor, cfg: Int8DynamicConfig) -> torch.Tensor:
    """The bound of the module docstring for y = x @ w.T: x (N, K), w (O, K) -> (N, O)."""
    qmax = 127 if cfg.reduce_range else 255
    step_x = (x.max().clamp(min=0) - x.min().clamp(max=0)) / qmax
    step_w = w.abs().amax(dim=1) / 127  # (O,)
    k = x.shape[1]
    return (x.abs().sum(1, keepdim=True) * step_w / 2 + step_x * w.abs().sum(1) + k * step_x * step_w / 2)


@pytest.mark.parametrize("reduce_range", RANGES)
@pytest.mark.parametrize("kind", ["linear", "conv1d", "square_conv1d"])
def test_a_layer_is_within_its_rounding_bound(kind, reduce_range):
    torch.manual_seed(1)
    cfg = Int8DynamicConfig(reduce_range=reduce_range)
    in_f, out_f = (48, 48) if kind == "square_conv1d" else (48, 80)
    if kind == "linear":
        layer = nn.Linear(in_f, out_f)
        q, w = Int8DynamicLinear.from_linear(layer, cfg), layer.weight
    else:
        layer = Conv1D(in_f, out_f)
        nn.init.normal_(layer.weight, std=0.2)
        nn.init.normal_(layer.bias, std=0.1)
        q, w = Int8DynamicLinear.from_conv1d(layer, cfg), layer.weight.t()
    x = torch.randn(2, 5, in_f) * 3 + 0.5  # (B, S, in): leading dimensions are kept
    with torch.inference_mode():
        want, got = layer(x), q(x)
    assert got.shape == want.shape == (2, 5, out_f) and got.dtype == torch.float32
    bound = worst_case_error(x.reshape(-1, in_f), w.detach(), cfg).view(2, 5, out_f)
    assert ((got - want).abs() <= bound + FP32_SLACK * want.abs().amax()).all()
    assert (got - want).abs().amax() > 0  # really quantised
    assert q.weight.dtype == torch.float32 and q.weight.shape == (out_f, in_f)  # nn.Linear's layout


# ---------------------------------------------------------------------------------------- the pass
def dense_layers(module: nn.Module) -> list[str]:
    return [n for n, m in module.named_modules() if isinstance(m, (nn.Linear, Conv1D))]


@pytest.mark.parametrize("family", ["turbo", "original"])
def test_the_pass_replaces_the_backbone_projections_and_the_speech_head_once(family):
    t3 = build_tiny_turbo_models(0).t3 if family == "turbo" else build_tiny_models(0).t3
    backbone = dense_layers(t3.tfmr)
    per_layer = 4 if family == "turbo" else 7  # GPT-2: c_attn, c_proj, c_fc, c_proj; Llama: q k v o gate up down
    assert len(backbone) == per_layer * len(t3.tfmr.h if family == "turbo" else t3.tfmr.layers)
    untouched = {n: m for n, m in t3.named_modules() if n.startswith(("cond_enc", "text_head"))}
    with torch.inference_mode():  # the pass leaves inference mode itself
        assert quantize_component("t3", t3, "int8_dynamic") == len(backbone) + 1
    assert dense_layers(t3.tfmr) == [] and isinstance(t3.speech_head, Int8DynamicLinear)
    assert all(dict(t3.named_modules())[n] is m for n, m in untouched.items())
    assert t3.device == torch.device("cpu")  # read off the speech head's weight
    assert quantize_component("t3", t3, "int8_dynamic") == 0  # already done: nothing more changes


def test_apply_passes_quantises_the_original_t3_and_nothing_else():
    models = build_tiny_models(0)
    s3gen_modules = [id(m) for m in models.s3gen.modules()]
    apply_passes(models.t3, INT8)
    apply_passes(models.s3gen, INT8)
    assert isinstance(models.t3.speech_head, Int8DynamicLinear) and dense_layers(models.t3.tfmr) == []
    assert [id(m) for m in models.s3gen.modules()] == s3gen_modules


# ---------------------------------------------------------------------------------------- fidelity
def teacher_forced(family: str, seed: int):
    """(float32 T3, its inputs): random conditioning, text and speech tokens."""
    g = torch.Generator().manual_seed(seed)
    if family == "turbo":
        t3 = build_tiny_turbo_models(seed).t3
        cond = T3Cond(speaker_emb=torch.randn(1, t3.cfg.speaker_embed_size, generator=g),
                      cond_prompt_speech_tokens=torch.randint(0, 6561, (1, 20), generator=g))
        text = torch.randint(0, 50000, (1, 12), generator=g)
        speech = torch.randint(0, 6561, (1, 64), generator=g)
    else:
        t3 = build_tiny_models(seed).t3
        cond = T3Cond(speaker_emb=torch.randn(1, t3.cfg.cond_enc.speaker_embed_size, generator=g), emotion_adv=0.5)
        text = torch.randint(0, 704, (2, 12), generator=g)  # the CFG pair
        speech = torch.randint(0, 6561, (2, 64), generator=g)
    return t3, (cond, text, speech)


@pytest.mark.parametrize("reduce_range", RANGES)
@pytest.mark.parametrize("family", ["turbo", "original"])
def test_int8_t3_logits_agree_with_float32(family, reduce_range):
    for seed in range(2):
        t3, inputs = teacher_forced(family, seed)
        q = copy.deepcopy(t3)
        quantize_component("t3", q, "int8_dynamic", Int8DynamicConfig(reduce_range=reduce_range))
        with torch.inference_mode():
            want = t3(*inputs).speech_logits[0]  # (N, V), row 0 (the conditional row for the CFG pair)
            got = q(*inputs).speech_logits[0]
        rel = (got - want).norm(dim=-1) / want.norm(dim=-1)
        assert rel.max() <= REL_ERR_BOUND[reduce_range], f"seed {seed}: max relative error {rel.max():.4f}"
        assert rel.min() > 0  # really quantised
        top1 = (got.argmax(-1) == want.argmax(-1)).float().mean()
        assert top1 >= TOP1_MIN, f"seed {seed}: top-1 agreement {top1:.3f}"


# ---------------------------------------------------------------------------------------- engine
@pytest.fixture(scope="module")
def turbo():
    return make_tiny_turbo_tts()


@pytest.fixture(scope="module")
def original():
    return make_tiny_tts()


def int8_engine(tts, opt: OptConfig):
    """An engine of ``tts``'s family built from its float32 weights with ``opt`` (``Engine.build``)."""
    return type(tts.engine).build(tts._weights, tts.tokenizer, opt, "cpu", tts.engine_cfg)


@pytest.mark.parametrize("family, text", [("turbo", "Hello there [laugh] friend."),
                                          ("original", "Hello there, friend.")])
def test_an_int8_engine_generates_through_the_engine_api(family, text, request):
    tts = request.getfixturevalue(family)
    before = {k: v.clone() for k, v in tts._weights.t3.state_dict().items()}
    engine = int8_engine(tts, INT8)
    assert isinstance(engine.models.t3.speech_head, Int8DynamicLinear)
    assert quantize_models(engine.models, INT8) == 0  # the engine's copy is done; again changes nothing
    req = SynthesisRequest(text, seed=3, max_new_tokens=MAX_TOKENS, watermark=False, chunk_size=5)
    res = engine.synthesize(req, tts.conds)
    assert 0 < res.generated_tokens[0] <= MAX_TOKENS
    assert 0 < res.speech_tokens[0].numel() <= MAX_TOKENS + TURBO_SILENCE
    assert res.wav.shape[-1] > 0 and torch.isfinite(res.wav).all()

    def stream() -> torch.Tensor:
        return torch.cat([c for c, _ in engine.stream(req, tts.conds)], dim=1)

    a, b = stream(), stream()
    assert torch.equal(a, b) and a.shape == res.wav.shape and torch.isfinite(a).all()
    # the facade's float32 weights are what they were: the pass replaced modules of the engine's copy
    after = tts._weights.t3.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, Int8DynamicLinear) for m in tts._weights.t3.modules())


def test_set_opt_builds_an_int8_t3(turbo):
    assert isinstance(turbo.with_opt(INT8).t3.speech_head, Int8DynamicLinear)
