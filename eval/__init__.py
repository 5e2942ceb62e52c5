"""A/B evaluation harness of chatterbox-fast (``python -m eval.ab``); see patches/README.md for how its
results feed the per-optimisation records."""
