"""Parity harness: our components against upstream's recorded fixtures (``scripts/check_parity.py``).

Not part of the runtime package. Import it with the repository root on ``sys.path``.
"""
