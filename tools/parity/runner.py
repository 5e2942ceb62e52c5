"""Compare our components with upstream's recorded outputs (the parity fixtures).

Each fixture stem has a checker module ``tools.parity.check_<stem>`` exposing
``check(fixture: Fixture, ctx: ParityContext) -> list[Comparison]``. A checker whose component
does not exist yet raises ``ComponentMissing`` (or its import fails), and the fixture is skipped.

A fixture set is defined by its files alone: every call parameter a checker needs (the weights salt
included) is read from the fixture's ``meta["params"]`` through ``Fixture.param``, never assumed.
"""
from __future__ import annotations

import importlib
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from chatterbox.checkpoint import OPTIONAL_S3GEN_KEYS, find_checkpoint_file, load_strict, read_state_dict
from chatterbox.synthetic import synth_state_dict

# Accept tolerances of the parity kit: max|a-b| <= atol + rtol * max|ref|.
DEFAULT_RTOL = 1e-4
DEFAULT_ATOL = 1e-5


class ComponentMissing(RuntimeError):
    """The component a fixture checks is not implemented yet."""


@dataclass
class Fixture:
    stem: str
    tensors: dict[str, torch.Tensor]
    meta: dict

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    @property
    def params(self) -> dict:
        """The call parameters upstream was run with (``meta["params"]``; empty when absent)."""
        params = self.meta.get("params", {})
        if not isinstance(params, dict):
            raise ValueError(f"fixture {self.stem!r}: meta['params'] is {type(params).__name__}, not an object")
        return params

    def param(self, name: str):
        """The call parameter ``name`` of this fixture; a ``ValueError`` naming both when it is missing."""
        params = self.params
        if name not in params:
            have = ", ".join(sorted(params)) or "none"
            raise ValueError(f"fixture {self.stem!r} has no call parameter {name!r} in meta['params'] "
                             f"(present: {have}); regenerate it with a generator that records its parameters")
        return params[name]


@dataclass
class Comparison:
    name: str
    max_abs: float
    tolerance: float
    ok: bool
    exact: bool = False
    snr_db: float | None = None  # signal-to-error ratio of float tensors (None for exact/int ones)

    def line(self) -> str:
        verdict = "ok" if self.ok else "FAIL"
        tol = "exact" if self.exact else f"{self.tolerance:.3e}"
        return f"{self.name}  max_abs={self.max_abs:.3e}  tol={tol}  {verdict}"

    def deviation_line(self) -> str:
        """For runs under a non-reference OptConfig: the deviation, not a verdict on it."""
        verdict = "ok" if self.ok else "DEV"
        tol = "exact" if self.exact else f"{self.tolerance:.3e}"
        snr = "" if self.snr_db is None else f"  snr={self.snr_db:.1f}dB"
        return f"{self.name}  max_abs={self.max_abs:.3e}  tol={tol}{snr}  {verdict}"


def compare(name: str, actual: torch.Tensor, expected: torch.Tensor,
            rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL) -> Comparison:
    """Integer tensors must match exactly; floats within ``atol + rtol * max|expected|``."""
    actual = torch.as_tensor(actual).detach().cpu()
    expected = torch.as_tensor(expected).detach().cpu()
    if tuple(actual.shape) != tuple(expected.shape):
        return Comparison(f"{name} (shape {list(actual.shape)} != {list(expected.shape)})",
                          float("inf"), 0.0, False, exact=not expected.is_floating_point())
    if not expected.is_floating_point():
        wrong = int((actual.to(expected.dtype) != expected).sum())
        return Comparison(name, float(wrong), 0.0, wrong == 0, exact=True)
    if expected.numel() == 0:
        return Comparison(name, 0.0, atol, True)
    diff = (actual.double() - expected.double()).abs()
    max_abs = float(diff.max()) if torch.isfinite(diff).all() else float("inf")
    tol = atol + rtol * float(expected.double().abs().max())
    return Comparison(name, max_abs, tol, max_abs <= tol, snr_db=snr_db(actual, expected))


def snr_db(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """10 log10(sum(expected^2) / sum((actual - expected)^2)); inf when equal."""
    ref = expected.double()
    err = float(((actual.double() - ref) ** 2).sum())
    sig = float((ref ** 2).sum())
    if err == 0.0:
        return float("inf")
    if sig == 0.0 or err != err:
        return float("-inf")
    return 10.0 * math.log10(sig / err)


# Weights salt of a context used without any fixture (direct use in tests): the recipe's default.
UNBOUND_SALT = 0


@dataclass
class ParityContext:
    """Where checkers get weights: a checkpoint directory, or synthetic weights with a salt.

    ``salt=None`` (the default) takes the salt from the fixture the context is bound to
    (``for_fixture``, which every checker calls), so each fixture gets the weights it was made with;
    an explicit ``salt`` overrides every fixture's. Models kept in ``cache`` are keyed by the weights
    they hold (``cache_key``), so fixtures with different salts never share a model.
    """

    ckpt_dir: Path | None = None
    salt: int | None = None
    device: str = "cpu"
    # An OptConfig preset or spec (``OptConfig.parse``); applied to every module ``load`` builds.
    opt: str = "reference"
    cache: dict = field(default_factory=dict)  # models shared by several fixtures, keyed by ``cache_key``
    fixture: Fixture | None = field(default=None, repr=False)

    def for_fixture(self, fx: Fixture) -> ParityContext:
        """This context bound to ``fx`` (its weights salt unless one was given); the cache is shared."""
        return replace(self, fixture=fx)

    @property
    def weights_salt(self) -> int:
        """The synthetic-weights salt: explicit, else the bound fixture's ``salt`` parameter."""
        if self.salt is not None:
            return int(self.salt)
        if self.fixture is not None:
            return int(self.fixture.param("salt"))
        return UNBOUND_SALT

    def cache_key(self, name: str) -> tuple:
        """Key of model ``name`` in ``cache``: which weights and which OptConfig it was built with."""
        weights = ("ckpt", str(self.ckpt_dir)) if self.ckpt_dir is not None else ("salt", self.weights_salt)
        return (name, weights, self.opt, self.device)

    @property
    def is_reference(self) -> bool:
        if self.opt.strip() == "reference":
            return True  # the reference run never imports the optimisation package
        from chatterbox.optim import OptConfig

        return OptConfig.parse(self.opt) == OptConfig.reference()

    def load(self, module: nn.Module, stem: str, prefix: str = "") -> nn.Module:
        """Strictly load the ``prefix`` part of checkpoint ``stem`` (ve, t3_cfg, s3gen) into ``module``,
        then apply the context's OptConfig to it."""
        optional = [k[len(prefix):] for k in OPTIONAL_S3GEN_KEYS if stem == "s3gen" and k.startswith(prefix)]
        if self.ckpt_dir is not None:
            state = read_state_dict(find_checkpoint_file(self.ckpt_dir, stem), prefix)
        else:
            state = synth_state_dict(module.state_dict(), prefix=prefix, salt=self.weights_salt)
        load_strict(module, state, f"{stem}[{prefix or '*'}]", optional=optional)
        module = module.to(self.device).eval()
        if not self.is_reference:
            from chatterbox.optim import OptConfig, apply_passes

            # Transforms in place; these modules are never switched back.
            module = apply_passes(module, OptConfig.parse(self.opt))
        return module


CHECKED_STEMS = (
    "mels", "s3tokenizer", "campplus", "voice_encoder", "embed_ref", "s3gen_flow", "hift",
    "s3gen_e2e", "prepare_conditionals", "streaming_chunks", "t3_forward", "t3_inference_steps",
    "text_and_token_utils",
)


def load_fixture(path: Path) -> Fixture:
    if path.suffix == ".json":
        return Fixture(path.stem, {}, json.loads(path.read_text()))
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("meta", "{}"))
    return Fixture(path.stem, load_file(str(path)), meta)


def find_checker(stem: str) -> Callable | None:
    try:
        mod = importlib.import_module(f"tools.parity.check_{stem}")
    except ModuleNotFoundError as exc:
        # no checker for this stem, or the library part it checks is not written yet
        if exc.name and (exc.name == f"tools.parity.check_{stem}" or exc.name.startswith("chatterbox")):
            return None
        raise
    return getattr(mod, "check", None)
