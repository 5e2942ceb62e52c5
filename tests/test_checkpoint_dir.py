"""Loading a checkpoint directory in the published layout (written by the synthetic writer)."""
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from chatterbox import ChatterboxTTS
from chatterbox.checkpoint import OPTIONAL_S3GEN_KEYS, CheckpointError, load_strict, read_state_dict
from chatterbox.loader import build_models
from chatterbox.synthetic_checkpoint import write_synthetic_checkpoint

pytestmark = pytest.mark.full_size


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic_ckpt")
    write_synthetic_checkpoint(out)
    return out


def _partial_dir(tmp_path, ckpt_dir, ve_state):
    """A directory whose ve file is ``ve_state`` and whose other files are the good ones."""
    for name in ("t3_cfg.safetensors", "s3gen.safetensors", "tokenizer.json", "conds.pt"):
        (tmp_path / name).symlink_to(ckpt_dir / name)
    save_file(ve_state, str(tmp_path / "ve.safetensors"))
    return tmp_path


def test_from_local_equals_the_in_memory_synthetic_model(ckpt_dir):
    torch.set_num_threads(2)
    local = ChatterboxTTS.from_local(ckpt_dir, "cpu")
    assert local.conds is not None  # the built-in voice from conds.pt
    a = local.synthesize("Hello.", max_new_tokens=8, seed=11, watermark=False)
    del local
    embedded = ChatterboxTTS.from_synthetic("cpu")
    b = embedded.synthesize("Hello.", max_new_tokens=8, seed=11, watermark=False)
    # Same weights and voice: identical tokens. The voices were computed in two runs whose CPU
    # convolutions may split work differently across threads (CAMPPlus moves by ~1e-8), which HiFT's
    # phase accumulation amplifies to ~1e-4 (FIXTURES.md tolerance study).
    assert all(torch.equal(x, y) for x, y in zip(a.speech_tokens, b.speech_tokens))
    assert (a.wav - b.wav).abs().max() < 3e-3


def test_missing_key_is_named(ckpt_dir, tmp_path):
    state = load_file(str(ckpt_dir / "ve.safetensors"))
    del state["lstm.weight_hh_l1"]
    with pytest.raises(CheckpointError, match=r"missing keys: lstm\.weight_hh_l1"):
        ChatterboxTTS.from_local(_partial_dir(tmp_path, ckpt_dir, state), "cpu")


def test_wrong_shape_is_named(ckpt_dir, tmp_path):
    state = load_file(str(ckpt_dir / "ve.safetensors"))
    state["proj.weight"] = torch.zeros(128, 256)
    with pytest.raises(CheckpointError, match=r"proj\.weight: checkpoint \[128, 256\], model \[256, 256\]"):
        ChatterboxTTS.from_local(_partial_dir(tmp_path, ckpt_dir, state), "cpu")


def test_unexpected_key_is_named(ckpt_dir, tmp_path):
    state = load_file(str(ckpt_dir / "ve.safetensors"))
    state["extra.bias"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"unexpected keys: extra\.bias"):
        ChatterboxTTS.from_local(_partial_dir(tmp_path, ckpt_dir, state), "cpu")


def test_missing_files_are_clear_errors(ckpt_dir, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        ChatterboxTTS.from_local(tmp_path / "nowhere", "cpu")
    shutil.copy(ckpt_dir / "ve.safetensors", tmp_path / "ve.safetensors")
    with pytest.raises(CheckpointError, match="t3_cfg.safetensors nor t3_cfg.pt"):
        ChatterboxTTS.from_local(tmp_path, "cpu")


def test_pt_files_load_like_safetensors(ckpt_dir, tmp_path):
    state = load_file(str(ckpt_dir / "ve.safetensors"))
    torch.save(state, tmp_path / "ve.pt")
    assert read_state_dict(tmp_path / "ve.pt").keys() == state.keys()
    models = build_models()
    load_strict(models.ve, read_state_dict(tmp_path / "ve.pt"), "ve.pt")
    assert torch.equal(models.ve.proj.weight, state["proj.weight"])


def test_s3gen_checkpoint_without_the_deterministic_tokenizer_buffers_loads(ckpt_dir):
    state = read_state_dict(ckpt_dir / "s3gen.safetensors")
    full = {k: state[k].clone() for k in OPTIONAL_S3GEN_KEYS}
    for key in OPTIONAL_S3GEN_KEYS:
        del state[key]
    s3gen = build_models().s3gen
    load_strict(s3gen, state, "s3gen", optional=OPTIONAL_S3GEN_KEYS)
    assert torch.equal(s3gen.tokenizer._mel_filters, full["tokenizer._mel_filters"])
    assert torch.equal(s3gen.tokenizer.window, full["tokenizer.window"])
