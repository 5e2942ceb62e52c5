import json

import pytest
import torch

from chatterbox.checkpoint import CheckpointError, load_strict, read_state_dict
from chatterbox.synthetic import key_seed, state_dict_digest, synth_tensor
from conftest import DATA

MANIFEST = json.loads((DATA / "manifest.json").read_text())
DIGESTS = json.loads((DATA / "synth_digests.json").read_text())


def _digest_of(fname: str) -> str:
    entries = MANIFEST["files"][fname]["entries"]
    keys = [e["key"] for e in entries]

    class LazyState(dict):
        def __missing__(self, key):
            e = by_key[key]
            return synth_tensor(key, e["shape"], getattr(torch, e["dtype"]))

    by_key = {e["key"]: e for e in entries}
    return state_dict_digest(LazyState(), keys)


@pytest.mark.parametrize("fname", ["ve.safetensors", "s3gen.safetensors"])
def test_synthetic_weights_match_recipe_digest(fname):
    assert _digest_of(fname) == DIGESTS[f"salt0/{fname}"]


@pytest.mark.full_size
def test_synthetic_t3_weights_match_recipe_digest():
    assert _digest_of("t3_cfg.safetensors") == DIGESTS["salt0/t3_cfg.safetensors"]


def test_salt_changes_values_and_seed():
    assert key_seed("a.weight", 0) != key_seed("a.weight", 1)
    a = synth_tensor("x.weight", (4, 4), torch.float32, salt=0)
    b = synth_tensor("x.weight", (4, 4), torch.float32, salt=1)
    assert not torch.equal(a, b)
    assert torch.equal(a, synth_tensor("x.weight", (4, 4), torch.float32, salt=0))


def test_recipe_rules():
    assert torch.equal(synth_tensor("bn.num_batches_tracked", (), torch.int64), torch.tensor(0))
    assert torch.equal(synth_tensor("bn.running_var", (3,)), torch.ones(3))
    assert torch.equal(synth_tensor("mel2wav.f0_predictor.classifier.bias", (1,)), torch.tensor([50.0]))
    norm = synth_tensor("ln.weight", (1000,))
    assert abs(float(norm.mean()) - 1.0) < 0.01
    w = synth_tensor("lin.weight", (256, 400))
    assert abs(float(w.std()) - 400 ** -0.5) < 0.002


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(3, 2)
        self.register_buffer("stat", torch.zeros(2))


def test_load_strict_names_missing_unexpected_and_misshaped_keys():
    m = _Tiny()
    good = {"a.weight": torch.ones(2, 3), "a.bias": torch.ones(2), "stat": torch.ones(2)}
    load_strict(m, good, "tiny")
    assert torch.equal(m.a.weight, torch.ones(2, 3))
    with pytest.raises(CheckpointError, match=r"missing keys: a\.bias"):
        load_strict(_Tiny(), {k: v for k, v in good.items() if k != "a.bias"}, "tiny")
    with pytest.raises(CheckpointError, match=r"unexpected keys: extra"):
        load_strict(_Tiny(), {**good, "extra": torch.ones(1)}, "tiny")
    with pytest.raises(CheckpointError, match=r"a\.weight: checkpoint \[3, 2\], model \[2, 3\]"):
        load_strict(_Tiny(), {**good, "a.weight": torch.ones(3, 2)}, "tiny")


def test_load_strict_optional_keys_keep_module_values():
    m = _Tiny()
    m.stat = torch.full((2,), 7.0)
    load_strict(m, {"a.weight": torch.ones(2, 3), "a.bias": torch.ones(2)}, "tiny", optional=["stat"])
    assert torch.equal(m.stat, torch.full((2,), 7.0))


def test_read_state_dict_formats_and_errors(tmp_path):
    from safetensors.torch import save_file

    sd = {"x.a": torch.ones(2), "y.b": torch.zeros(3)}
    save_file(sd, str(tmp_path / "m.safetensors"))
    torch.save(sd, tmp_path / "m.pt")
    torch.save({"model": [sd]}, tmp_path / "wrapped.pt")
    assert set(read_state_dict(tmp_path / "m.safetensors", "x.")) == {"a"}
    assert set(read_state_dict(tmp_path / "m.pt")) == {"x.a", "y.b"}
    assert set(read_state_dict(tmp_path / "wrapped.pt", "y.")) == {"b"}
    (tmp_path / "broken.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        read_state_dict(tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "absent.safetensors")


def test_built_models_match_the_published_checkpoint_layout_in_order():
    from chatterbox.loader import build_models

    models = build_models()
    files = MANIFEST["files"]
    for stem, module in (("ve", models.ve), ("t3_cfg", models.t3), ("s3gen", models.s3gen)):
        ours = [(k, list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in module.state_dict().items()]
        published = [(e["key"], e["shape"], e["dtype"]) for e in files[f"{stem}.safetensors"]["entries"]]
        assert ours == published, stem
