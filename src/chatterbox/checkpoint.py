"""Checkpoint files in the published layout, and strict loading into our modules."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

log = logging.getLogger(__name__)

REPO_ID = "ResembleAI/chatterbox"
CHECKPOINT_STEMS = ("ve", "t3_cfg", "s3gen")
TOKENIZER_FILE = "tokenizer.json"
CONDS_FILE = "conds.pt"
# Written by scripts/make_synthetic_checkpoint.py next to weights that are not speech.
SYNTHETIC_MARKER = "SYNTHETIC.txt"
# Deterministic S3Gen buffers that some published S3Gen checkpoints carry and others omit.
OPTIONAL_S3GEN_KEYS = ("tokenizer._mel_filters", "tokenizer.window")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, or does not match the model's keys and shapes."""


@dataclass(frozen=True)
class KeyReport:
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    mis_shaped: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mis_shaped)

    def describe(self, what: str, limit: int = 20) -> str:
        lines = [f"{what}: checkpoint does not match the model"]
        for title, items in (("missing keys", self.missing), ("unexpected keys", self.unexpected)):
            if items:
                shown = ", ".join(items[:limit]) + (" ..." if len(items) > limit else "")
                lines.append(f"  {len(items)} {title}: {shown}")
        if self.mis_shaped:
            lines.append(f"  {len(self.mis_shaped)} keys with the wrong shape:")
            for key, got, want in self.mis_shaped[:limit]:
                lines.append(f"    {key}: checkpoint {list(got)}, model {list(want)}")
        return "\n".join(lines)


def compare_keys(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> KeyReport:
    missing = tuple(k for k in expected if k not in given)
    unexpected = tuple(k for k in given if k not in expected)
    mis_shaped = tuple(
        (k, tuple(given[k].shape), tuple(expected[k].shape))
        for k in expected
        if k in given and tuple(given[k].shape) != tuple(expected[k].shape)
    )
    return KeyReport(missing, unexpected, mis_shaped)


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], what: str,
                optional: Iterable[str] = ()) -> nn.Module:
    """Load ``state`` into ``module`` with every key and shape checked; a clear error names the bad keys.

    Keys listed in ``optional`` may be absent from ``state``: the module keeps its own value.
    Tensors are assigned (no copy), so a module built on the meta device is materialised.
    """
    expected = module.state_dict()
    state = dict(state)
    for key in optional:
        if key not in state and key in expected and expected[key].device.type != "meta":
            state[key] = expected[key]
    report = compare_keys(expected, state)
    if not report.ok:
        raise CheckpointError(report.describe(what))
    converted = {k: v.to(expected[k].dtype) if v.dtype != expected[k].dtype and v.is_floating_point() else v
                 for k, v in state.items()}
    module.load_state_dict(converted, strict=True, assign=True)
    left_on_meta = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left_on_meta:
        raise CheckpointError(f"{what}: tensors not materialised by the checkpoint (built on the meta "
                              f"device and not in the state dict): {left_on_meta[:10]}")
    return module


def read_state_dict(path: str | Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` or ``.pt`` state dict; keep only keys under ``prefix`` (stripped)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            out = {}
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    if key.startswith(prefix):
                        out[key[len(prefix):]] = f.get_tensor(key)
            return out
        raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as exc:  # a truncated or foreign file
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if isinstance(raw, dict) and "model" in raw and isinstance(raw["model"], (list, tuple)):
        raw = raw["model"][0]
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    return {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}


def find_checkpoint_file(ckpt_dir: str | Path, stem: str) -> Path:
    ckpt_dir = Path(ckpt_dir)
    for suffix in (".safetensors", ".pt"):
        candidate = ckpt_dir / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    raise CheckpointError(f"{ckpt_dir}: neither {stem}.safetensors nor {stem}.pt found")


def is_synthetic_checkpoint(ckpt_dir: str | Path) -> bool:
    """Whether ``ckpt_dir`` holds synthetic weights (it carries ``SYNTHETIC.txt``): they do not speak."""
    return (Path(ckpt_dir) / SYNTHETIC_MARKER).is_file()
