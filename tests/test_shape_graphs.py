"""cuda_graphs on the per-voice encoders (CAMPPlus, voice encoder): per-shape graphs, eager off CUDA."""
from __future__ import annotations

import pytest
import torch

from chatterbox.models.s3gen.xvector import CAMPPlus, CAMPPlusConfig
from chatterbox.models.voice_encoder import VoiceEncoder, VoiceEncoderConfig
from chatterbox.opt import OptConfig
from chatterbox.passes import ShapeGraphs, apply_to_components, is_wrapped, reset_components

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def encoders(device: str = "cpu"):
    torch.manual_seed(0)
    camp = CAMPPlus(CAMPPlusConfig.tiny()).eval().requires_grad_(False).to(device)
    ve = VoiceEncoder(VoiceEncoderConfig.tiny()).eval().requires_grad_(False).to(device)
    return camp, ve


def inputs(camp: CAMPPlus, ve: VoiceEncoder, frames: int, device: str = "cpu"):
    g = torch.Generator().manual_seed(frames)
    feats = torch.randn(1, frames, camp.cfg.feat_dim, generator=g).to(device)
    mels = torch.randn(3, 20, ve.cfg.n_mels, generator=g).to(device)
    return feats, mels


def test_pass_wraps_forward_and_runs_eagerly_on_the_cpu():
    camp, ve = encoders()
    feats, mels = inputs(camp, ve, 64)
    with torch.inference_mode():
        want = camp(feats), ve(mels)
    opt = OptConfig.parse("reference+campplus.cuda_graphs=1+voice_encoder.cuda_graphs=1")
    state = apply_to_components([("campplus", camp), ("voice_encoder", ve)], opt)
    assert is_wrapped(camp, "forward") and is_wrapped(ve, "forward")
    assert isinstance(camp.__dict__["forward"], ShapeGraphs)
    with torch.inference_mode():
        got = camp(feats), ve(mels)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert not camp.__dict__["forward"].graphs  # nothing captured off CUDA
    reset_components(state)
    assert not is_wrapped(camp, "forward") and not is_wrapped(ve, "forward")


def test_other_components_reject_the_switch():
    with pytest.raises(ValueError, match="no CUDA-graph runner"):
        OptConfig.parse("reference+hift.cuda_graphs=1")


@pytest.mark.gpu
@gpu
def test_gpu_per_shape_graphs_equal_eager_and_replay():
    camp, ve = encoders("cuda")
    opt = OptConfig.parse("reference+campplus.cuda_graphs=1+voice_encoder.cuda_graphs=1")
    cases = [inputs(camp, ve, n, "cuda") for n in (64, 80)]
    with torch.inference_mode():
        want = [(camp(f), ve(m)) for f, m in cases]
    apply_to_components([("campplus", camp), ("voice_encoder", ve)], opt)
    for _ in range(2):  # capture, then replay
        with torch.inference_mode():
            got = [(camp(f), ve(m)) for f, m in cases]
        for (gc, gv), (wc, wv) in zip(got, want):
            assert float((gc - wc).abs().max()) <= 1e-5 and float((gv - wv).abs().max()) <= 1e-5
    graphs = camp.__dict__["forward"].graphs
    assert len(graphs) == 2 and all(g.captured for g in graphs.values())
