"""T3 logits processing and sampling: HF semantics vs plain reference code, and the fixture's steps."""
from __future__ import annotations

import math

import pytest
import torch

from chatterbox.models.t3.sampling import (
    REC_BEFORE_TOP_P, REC_PROBS, REC_RAW_LOGITS, RESEMBLE_ORDER, STREAM_ORDER, SamplingConfig, StepRecorder,
    apply_min_p, apply_repetition_penalty, apply_temperature, apply_top_p, cfg_mix, mark_seen, new_seen,
    process_logits, sample_next,
)
from conftest import load_fixture

NEG_INF = float("-inf")


def _logits(rows: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return scale * torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- plain references (Python loops)
def ref_repetition_penalty(logits: torch.Tensor, ids: list[list[int]], penalty: float) -> torch.Tensor:
    out = logits.clone()
    for b, row_ids in enumerate(ids):
        for i in set(row_ids):
            s = float(logits[b, i])
            out[b, i] = s * penalty if s < 0 else s / penalty
    return out


def ref_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the most likely ids until the kept mass exceeds ``top_p`` (the nucleus), in float64."""
    out = torch.full_like(logits, NEG_INF)
    for b in range(logits.shape[0]):
        probs = logits[b].double().softmax(-1).tolist()
        order = sorted(range(len(probs)), key=lambda i: probs[i])  # ascending
        removed_mass = 0.0
        for rank, i in enumerate(order):
            removed_mass += probs[i]
            is_last = rank == len(order) - 1
            if removed_mass > 1 - top_p or is_last:  # from here on everything is kept
                for j in order[rank:]:
                    out[b, j] = logits[b, j]
                break
    return out


def ref_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    out = logits.clone()
    for b in range(logits.shape[0]):
        probs = logits[b].double().softmax(-1)
        cut = min_p * float(probs.max())
        for i in range(logits.shape[1]):
            if float(probs[i]) < cut:
                out[b, i] = NEG_INF
    return out


# ----------------------------------------------------------------------------- processors
def test_repetition_penalty_matches_reference_with_duplicates():
    logits = _logits(2, 50, seed=1)
    ids = [[3, 7, 7, 49, 0], [10, 11, 3]]
    seen = torch.cat([new_seen(1, 50, torch.tensor([row])) for row in ids])
    got = apply_repetition_penalty(logits, seen, 2.0)
    assert torch.equal(got, ref_repetition_penalty(logits, ids, 2.0))
    # untouched ids keep their exact value; the input is not modified
    assert torch.equal(got[0, 1], logits[0, 1])


def test_new_seen_marks_initial_ids_only():
    seen = new_seen(1, 20, torch.tensor([[5]]))
    assert seen.shape == (1, 20) and seen.dtype == torch.bool
    assert seen.sum() == 1 and seen[0, 5]
    seen2 = mark_seen(seen, torch.tensor([[7]]))
    assert seen.sum() == 1 and seen2.sum() == 2  # out of place


@pytest.mark.parametrize("top_p", [0.8, 0.5, 0.95, 0.0])
def test_top_p_matches_reference(top_p):
    logits = _logits(3, 300, seed=2)
    got = apply_top_p(logits, top_p)
    want = ref_top_p(logits, top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    kept = ~torch.isinf(got)
    assert torch.equal(got[kept], logits[kept])
    assert kept.sum(-1).min() >= 1  # the most likely id always survives


def test_top_p_one_is_identity():
    logits = _logits(1, 100, seed=3)
    assert torch.equal(apply_top_p(logits, 1.0), logits)


@pytest.mark.parametrize("min_p", [0.05, 0.3, 1.0])
def test_min_p_matches_reference(min_p):
    logits = _logits(2, 200, seed=4)
    got = apply_min_p(logits, min_p)
    assert torch.equal(torch.isinf(got), torch.isinf(ref_min_p(logits, min_p)))
    assert (~torch.isinf(got)).sum(-1).min() >= 1
    assert torch.equal(apply_min_p(logits, 0.0), logits)


def test_temperature_and_cfg():
    c, u = _logits(1, 30, seed=5), _logits(1, 30, seed=6)
    assert torch.equal(cfg_mix(c, u, 0.5), c + 0.5 * (c - u))
    assert torch.equal(apply_temperature(c, 1.0), c)
    assert torch.allclose(apply_temperature(c, 0.8), c / 0.8)


@pytest.mark.parametrize("order", [STREAM_ORDER, RESEMBLE_ORDER])
def test_process_logits_follows_order(order):
    cfg = SamplingConfig(temperature=0.7, top_p=0.9, min_p=0.05, repetition_penalty=1.3, order=order)
    logits = _logits(1, 120, seed=7)
    seen = new_seen(1, 120, torch.tensor([[1, 2, 3, 50]]))
    x = logits
    for stage in order:
        x = {"temperature": lambda t: apply_temperature(t, 0.7),
             "repetition_penalty": lambda t: apply_repetition_penalty(t, seen, 1.3),
             "min_p": lambda t: apply_min_p(t, 0.05),
             "top_p": lambda t: apply_top_p(t, 0.9)}[stage](x)
    rec = StepRecorder()
    assert torch.equal(process_logits(logits, seen, cfg, rec), x)
    assert len(rec.steps[REC_BEFORE_TOP_P]) == 1


def test_config_validation():
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=1.5)
    with pytest.raises(ValueError, match="min_p"):
        SamplingConfig(min_p=-0.1)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=0.0)
    with pytest.raises(ValueError, match="repetition_penalty"):
        SamplingConfig(repetition_penalty=0.0)
    with pytest.raises(ValueError, match="order"):
        SamplingConfig(order=("temperature", "top_p"))
    assert SamplingConfig.published().order == STREAM_ORDER
    assert SamplingConfig.resemble().order == RESEMBLE_ORDER


# ------------------------------------------------------------------------------- sampling
def test_sample_next_seeded_reproducible_and_forced():
    raw = _logits(2, 64, seed=8)
    seen = new_seen(1, 64, torch.tensor([[0]]))
    cfg = SamplingConfig.published()
    draws = [sample_next(raw, seen, cfg, torch.Generator().manual_seed(s)) for s in (11, 11, 12)]
    assert draws[0].shape == (1, 1) and draws[0].dtype == torch.long
    assert torch.equal(draws[0], draws[1])
    many = {int(sample_next(raw, seen, cfg, torch.Generator().manual_seed(s))) for s in range(40)}
    assert len(many) > 1  # it does sample
    rec = StepRecorder()
    forced = torch.tensor([[5]])
    assert torch.equal(sample_next(raw, seen, cfg, forced=forced, record=rec), forced)
    probs = rec.stacked(REC_PROBS)[0]
    assert torch.allclose(probs.sum(), torch.tensor(1.0)) and torch.equal(rec.stacked(REC_RAW_LOGITS)[0], raw)
    # every sampled id lies inside the nucleus
    assert all(probs[0, i] > 0 for i in many)


# ------------------------------------------------- upstream's recorded steps (no model needed)
def test_fixture_steps_processing_chain():
    """raw logits -> CFG, temperature, penalty over [BOS]+previous -> top-p -> softmax, as recorded."""
    fx = load_fixture("t3_inference_steps")
    raw, before, probs = fx["step_raw_logits"], fx["step_logits_before_top_p"], fx["step_probs"]
    tokens = fx["predicted_tokens"]
    cfg = SamplingConfig(temperature=0.8, cfg_weight=0.5, top_p=0.8, repetition_penalty=2.0)
    seen = new_seen(1, raw.shape[-1], torch.tensor([[6561]]))
    for step in range(raw.shape[0]):
        rec = StepRecorder()
        sample_next(raw[step], seen, cfg, forced=tokens[:, step:step + 1], record=rec)
        assert torch.allclose(rec.stacked(REC_BEFORE_TOP_P)[0, 0], before[step], rtol=0, atol=1e-5)
        assert (rec.stacked(REC_PROBS)[0, 0] - probs[step]).abs().max() <= 1e-6
        # top-p alone on upstream's own scores reproduces its filtering exactly
        mine = apply_top_p(before[step:step + 1], 0.8).softmax(-1)
        assert torch.equal(torch.isinf(mine.log()), probs[step:step + 1] == 0)
        seen = mark_seen(seen, tokens[:, step:step + 1])
    assert math.isclose(float(probs.sum(-1).mean()), 1.0, rel_tol=1e-5)
