"""Turbo/Nano checkpoints: strict loading with clear errors, the token-table remap, the published layout."""
from __future__ import annotations

import gc

import pytest
import torch
from safetensors.torch import save_file

from chatterbox.checkpoint import CheckpointError
from chatterbox.loader_turbo import (WTE_KEY, build_turbo_models, load_t3_turbo, load_turbo_models,
                                     t3_checkpoint_shapes)
from chatterbox.models.t3_turbo.t3_turbo import T3Turbo, T3TurboConfig
from chatterbox.synthetic import synth_state_dict, synth_tensor

TINY = T3TurboConfig.tiny()


def tiny_file_state(salt: int = 4) -> dict[str, torch.Tensor]:
    """A tiny T3 in the published file layout (token table included)."""
    with torch.device("meta"):
        model = T3Turbo(TINY)
    return {k: synth_tensor(k, shape, torch.float32, salt) for k, shape in t3_checkpoint_shapes(model).items()}


def write(tmp_path, state, name="t3.safetensors"):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_published_layouts():
    for nano, dim, layers in ((False, 1024, 24), (True, 768, 12)):
        t3, s3gen, _ = build_turbo_models(nano)
        shapes = t3_checkpoint_shapes(t3)
        # upstream's T3 state dict (299 keys for Turbo): wte, wpe, 12 a block, ln_f, 7 of T3's own
        assert len(shapes) == 2 + 12 * layers + 2 + 7
        assert shapes[WTE_KEY] == (50276, dim) and shapes["speech_head.bias"] == (6563,)
        assert shapes["cond_enc.spkr_enc.weight"] == (dim, 256)
        assert "flow.decoder.estimator.time_embed_mixer.weight" in s3gen.state_dict()


def test_round_trip_drops_the_token_table(tmp_path):
    state = tiny_file_state()
    model = load_t3_turbo(write(tmp_path, state), cfg=TINY)
    assert WTE_KEY not in model.state_dict()
    assert torch.equal(model.speech_head.bias, state["speech_head.bias"])
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    state.pop(WTE_KEY)  # a file without the token table is accepted
    load_t3_turbo(write(tmp_path, state, "no_wte.safetensors"), cfg=TINY)


def test_strict_errors_name_the_keys(tmp_path):
    state = tiny_file_state()
    missing = {k: v for k, v in state.items() if k != "speech_head.bias"}
    with pytest.raises(CheckpointError, match="missing keys: speech_head.bias"):
        load_t3_turbo(write(tmp_path, missing, "a.safetensors"), cfg=TINY)
    extra = {**state, "cond_enc.emotion_adv_fc.weight": torch.zeros(TINY.dim, 1)}
    with pytest.raises(CheckpointError, match="unexpected keys: cond_enc.emotion_adv_fc.weight"):
        load_t3_turbo(write(tmp_path, extra, "b.safetensors"), cfg=TINY)
    wrong = {**state, "tfmr.wpe.weight": torch.zeros(7, TINY.dim)}
    with pytest.raises(CheckpointError, match="tfmr.wpe.weight: checkpoint \\[7, 64\\]"):
        load_t3_turbo(write(tmp_path, wrong, "c.safetensors"), cfg=TINY)
    other = {**state, WTE_KEY: torch.zeros(50276, 32)}
    with pytest.raises(CheckpointError, match="Turbo file loaded as Nano"):
        load_t3_turbo(write(tmp_path, other, "d.safetensors"), cfg=TINY)
    with pytest.raises(CheckpointError, match="not found"):
        load_t3_turbo(tmp_path / "absent.safetensors", cfg=TINY)


def test_missing_files_fail_before_loading(tmp_path):
    with pytest.raises(CheckpointError, match="directory not found"):
        load_turbo_models(tmp_path / "absent")
    with pytest.raises(CheckpointError, match="t3_nano_v1"):
        load_turbo_models(tmp_path, nano=True)
    (tmp_path / "t3_turbo_v1.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="s3gen_meanflow"):
        load_turbo_models(tmp_path)


@pytest.mark.full_size
def test_synthetic_directory_loads_strictly(tmp_path):
    """The written Nano directory (published layout) loads strictly and holds the recipe's values."""
    from chatterbox.synthetic_turbo import write_synthetic_turbo_checkpoint

    write_synthetic_turbo_checkpoint(tmp_path, salt=2, variants=("nano",))
    models = load_turbo_models(tmp_path, nano=True)
    assert models.conds is None and models.tokenizer.vocab_size == 50276
    for key in ("speech_head.weight", "tfmr.h.3.attn.c_attn.weight"):
        want = synth_state_dict({key: models.t3.state_dict()[key]}, salt=2)[key]
        assert torch.equal(models.t3.state_dict()[key], want)
    mixer = "flow.decoder.estimator.time_embed_mixer.weight"
    assert torch.equal(models.s3gen.state_dict()[mixer], synth_tensor(mixer, (1024, 2048), torch.float32, 2))
    del models
    gc.collect()
