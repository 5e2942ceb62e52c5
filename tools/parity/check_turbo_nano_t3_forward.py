"""Nano's teacher-forced forward: the Turbo checker (the fixture names its model)."""
from .check_turbo_t3_forward import check

__all__ = ["check"]
