"""cuda_graphs on the per-voice encoders (CAMPPlus, voice encoder): the engine swaps each for a
``GraphedForward`` (one graph per exact input shape, from the engine's ``GraphRegistry``); off CUDA, or
with the registry disabled, the wrapped module runs as it is."""
from __future__ import annotations

import logging

import pytest
import torch

from chatterbox.engine import Engine
from chatterbox.engine.graph_modules import SHAPE_GRAPHS_KEPT, GraphedForward
from chatterbox.engine.graphs import GraphRegistry
from chatterbox.loader import build_tiny_models
from chatterbox.models.s3gen.xvector import CAMPPlus, CAMPPlusConfig
from chatterbox.models.voice_encoder import VoiceEncoder, VoiceEncoderConfig
from chatterbox.optim import OptConfig
from chatterbox.text import EnTokenizer
from chatterbox.text_vocab import write_tokenizer_json

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
SPEC = "reference+campplus.cuda_graphs=1+voice_encoder.cuda_graphs=1"


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


def wrap(camp, ve, graphs: GraphRegistry):
    return GraphedForward(camp, graphs, "campplus"), GraphedForward(ve, graphs, "voice_encoder")


def test_wrapper_runs_the_module_eagerly_on_the_cpu():
    camp, ve = encoders()
    feats, mels = inputs(camp, ve, 64)
    with torch.inference_mode():
        want = camp(feats), ve(mels)
    graphs = GraphRegistry(torch.device("cpu"), enabled=True)  # asked for, but there is no CUDA here
    assert not graphs.enabled
    gcamp, gve = wrap(camp, ve, graphs)
    with torch.inference_mode():
        got = gcamp(feats), gve(mels)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert len(graphs) == 0  # nothing captured off CUDA
    # the wrapper keeps the module's other attributes and its parameters
    assert gcamp.cfg is camp.cfg and gcamp.features == camp.features and gve.cfg is ve.cfg
    assert {k.removeprefix("inner.") for k in gcamp.state_dict()} == set(camp.state_dict())


def test_engine_on_the_cpu_warns_and_keeps_the_encoders_unwrapped(tmp_path, caplog):
    weights = build_tiny_models(0)
    tok = EnTokenizer(write_tokenizer_json(tmp_path / "tokenizer.json"))
    with caplog.at_level(logging.WARNING):
        engine = Engine.build(weights, tok, OptConfig.parse(SPEC), "cpu")
    assert "needs a CUDA device" in caplog.text
    parts = engine.components()
    assert isinstance(parts["campplus"], CAMPPlus) and isinstance(parts["voice_encoder"], VoiceEncoder)
    assert parts["campplus"] is not weights.s3gen.speaker_encoder  # the engine's own copy


def test_other_components_reject_the_switch():
    with pytest.raises(ValueError, match="no CUDA-graph runner"):
        OptConfig.parse("reference+hift.cuda_graphs=1")


@pytest.mark.gpu
@gpu
def test_gpu_per_shape_graphs_equal_eager_and_replay():
    camp, ve = encoders("cuda")
    cases = [inputs(camp, ve, n, "cuda") for n in (64, 80)]
    with torch.inference_mode():
        want = [(camp(f), ve(m)) for f, m in cases]
    graphs = GraphRegistry(torch.device("cuda"), enabled=True)
    gcamp, gve = wrap(camp, ve, graphs)
    for _ in range(2):  # capture, then replay
        with torch.inference_mode():
            got = [(gcamp(f), gve(m)) for f, m in cases]
        for (gc, gv), (wc, wv) in zip(got, want):
            assert float((gc - wc).abs().max()) <= 1e-5 and float((gv - wv).abs().max()) <= 1e-5
    assert graphs.count("campplus") == 2 and graphs.count("voice_encoder") == 1  # ve's input shape is fixed
    assert len(graphs.captured()) == 3
    kept, values = got[0][0], got[0][0].clone()
    with torch.inference_mode():
        other = gcamp(2 * cases[0][0])  # the same graph replayed on other data
    assert not torch.equal(other, values) and torch.equal(kept, values)  # outputs are clones the caller owns
    # a few reference lengths are kept, least recently used dropped first
    with torch.inference_mode():
        for n in range(96, 96 + 16 * SHAPE_GRAPHS_KEPT, 16):
            gcamp(inputs(camp, ve, n, "cuda")[0])
    assert graphs.count("campplus") == SHAPE_GRAPHS_KEPT


@pytest.mark.gpu
@gpu
def test_gpu_engine_swaps_in_graphed_encoders(tmp_path):
    weights = build_tiny_models(0)
    tok = EnTokenizer(write_tokenizer_json(tmp_path / "tokenizer.json"))
    engine = Engine.build(weights, tok, OptConfig.parse(SPEC), "cuda")
    parts = engine.components()
    assert isinstance(parts["campplus"], GraphedForward) and isinstance(parts["voice_encoder"], GraphedForward)
    assert parts["campplus"].graphs is engine.graphs and engine.graphs.enabled
    assert weights.s3gen.speaker_encoder.xvector is not parts["campplus"].xvector
