"""Nano's sampling loop: the Turbo checker (the fixture names its model)."""
from .check_turbo_t3_inference_steps import check

__all__ = ["check"]
