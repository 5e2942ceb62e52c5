#!/usr/bin/env bash
# Pinned upstream Chatterbox-Turbo (PyPI chatterbox-tts==0.1.7) on the lent GPU machine, without its
# 857 MB virtual environment: only the packages the GPU image lacks travel, as wheels in .upwheels/
# (about 5 MB; docs/turbo_parity.md, "The side environment on the GPU machine").
#
#   bash eval/device_upstream.sh fetch     # here, once: download the pinned wheels into .upwheels/
#   bash eval/device_upstream.sh           # there: install them into $UP_SITE, write $UP_ENV/bin/python
#
# The second form prints, as its last line, the side environment's directory (default /tmp/upenv),
# which `python -m eval.ab --model turbo --upstream /tmp/upenv` takes. Its interpreter is the image's
# python3 with PYTHONPATH=$UP_SITE and nothing else: our src/ is never on it (both packages are called
# `chatterbox`). torch, torchaudio, numpy, numba, scipy, transformers, huggingface_hub, safetensors,
# tokenizers, einops, onnx, ... are the image's own.
#
# Settings (environment): UP_PYTHON (interpreter to build on, default python3), UP_WHEELS (default
# .upwheels), UP_SITE (default /tmp/upsite), UP_ENV (default /tmp/upenv).
set -euo pipefail
cd "$(dirname "$0")/.."
UP_PYTHON=${UP_PYTHON:-python3}
UP_WHEELS=${UP_WHEELS:-.upwheels}
UP_SITE=${UP_SITE:-/tmp/upsite}
UP_ENV=${UP_ENV:-/tmp/upenv}

# What upstream's Turbo path imports and the image lacks, at the versions of the CPU side environment
# that made tests/fixtures/turbo. resemble-perth (34 MB, the watermark) is replaced by a stub below.
WHEELS=(
  chatterbox-tts==0.1.7   # upstream itself
  diffusers==0.29.0       # attention / feed-forward blocks of the meanflow decoder
  conformer==0.3.2        # imported at module level by the matcha decoder (unused by Turbo, 4 kB)
  omegaconf==2.4.0        # flow.py (DictConfig); vendors its antlr4 runtime
  s3tokenizer==0.3.0      # the speech tokenizer's modules
  librosa==0.11.0         # load, resample, mel filters (upstream pins it)
  pyloudnorm==0.2.0       # prepare_conditionals' loudness normalisation
  soundfile==0.14.0       # librosa.load reads the reference file (libsndfile inside)
  cffi==2.1.1             # soundfile's _cffi_backend
  pycparser==3.12         # cffi (numba imports cffi when present)
  soxr==1.1.0             # librosa.resample's default resampler
  audioread==3.1.0        # librosa.core.audio imports it
  decorator==5.3.2        # librosa.util.decorators
  pooch==1.9.0            # librosa.util.files (example data; imported, never used here)
  platformdirs==4.14.9    # pooch
)

fetch() {
  mkdir -p "$UP_WHEELS"
  grep -qx '/.upwheels/' .git/info/exclude 2>/dev/null || echo '/.upwheels/' >> .git/info/exclude
  "$UP_PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$UP_WHEELS" "${WHEELS[@]}" 2>&1 \
    | { grep -v '^WARNING: Location' || true; }
  ls "$UP_WHEELS"/*.whl | wc -l | xargs echo "wheels:"
  du -ch "$UP_WHEELS"/*.whl | tail -1
}

# resemble-perth stub. Upstream's ChatterboxTurboTTS.__init__ builds perth.PerthImplicitWatermarker()
# and only generate()'s last line calls apply_watermark. eval/upstream_turbo_driver.py runs generate's
# steps without that line (ours is timed without the watermark too), so the object is built and never
# used: this stub keeps the import and the constructor, and refuses the call.
write_perth_stub() {
  mkdir -p "$UP_SITE/perth"
  cat > "$UP_SITE/perth/__init__.py" <<'EOF'
"""Stand-in for resemble-perth on the GPU side environment (eval/device_upstream.sh): the Turbo
benchmark driver never watermarks, so only the constructor is needed."""

STUB = True


class PerthImplicitWatermarker:
    def __init__(self, *args, **kwargs):
        pass

    def apply_watermark(self, *args, **kwargs):
        raise RuntimeError("perth is a stub here (eval/device_upstream.sh): the real watermarker is not installed")

    def get_watermark(self, *args, **kwargs):
        raise RuntimeError("perth is a stub here (eval/device_upstream.sh): the real watermarker is not installed")
EOF
}

# numba stub, written only when the image's numba fails to import (or UP_NUMBA_STUB=1). librosa
# decorates a few functions with numba when its modules load; on the Turbo path (librosa.load,
# librosa.resample with soxr, librosa.filters.mel, librosa.stft) none of them runs: after
# load + prepare_conditionals + generate, none of librosa's numba dispatchers had compiled anything
# (checked on the CPU with numba 0.68.1). jit/njit/stencil give back the plain Python function (same
# results, only slower, should one ever run); vectorize/guvectorize give one that refuses to run.
write_numba_stub() {
  mkdir -p "$UP_SITE/numba"
  cat > "$UP_SITE/numba/__init__.py" <<'EOF'
"""Stand-in for numba on the GPU side environment (eval/device_upstream.sh): librosa needs its
decorators at import time; upstream Turbo never calls the decorated functions."""
import numpy as _np

STUB = True
__version__ = "0+stub"
prange = range


def jit(*args, **kwargs):
    if len(args) == 1 and callable(args[0]) and not kwargs:
        return args[0]
    return lambda func: func


njit = stencil = jit


def _refuse(func):
    def refused(*args, **kwargs):
        raise RuntimeError(f"{func.__name__} needs numba, a stub here (eval/device_upstream.sh)")
    refused.__name__, refused.__doc__ = func.__name__, func.__doc__
    return refused


def vectorize(*args, **kwargs):
    if len(args) == 1 and callable(args[0]) and not kwargs:
        return _refuse(args[0])
    return _refuse


guvectorize = vectorize


def __getattr__(name):  # type names used inside decorated bodies (numba.uint32, ...)
    if hasattr(_np, name):
        return getattr(_np, name)
    raise AttributeError(name)
EOF
}

# NumPy 2 fix for upstream's norm_loudness. 0.1.7 pins numpy<2 (Python < 3.13), where a float32
# waveform times a float64 NumPy scalar stays float32 (the scalar is cast to float32 first). The image
# has NumPy 2, whose promotion rules (NEP 50) make that product float64, and prepare_conditionals then
# fails in the S3 tokenizer (float32 mel filters @ float64 spectrum). Casting the gain to the
# waveform's own dtype first is exactly the NumPy 1 arithmetic, so upstream computes what it computes
# under its own pins. The edit is checked: it must match the pinned line exactly once.
patch_norm_loudness() {
  "$1" - "$UP_SITE/chatterbox/tts_turbo.py" <<'EOF'
import sys
path = sys.argv[1]
text = open(path).read()
old = "wav = wav * gain_linear\n"
new = "wav = wav * wav.dtype.type(gain_linear)  # eval/device_upstream.sh: NumPy 1 promotion\n"
if text.count(old) != 1:
    raise SystemExit(f"{path}: expected one '{old.strip()}' (chatterbox-tts 0.1.7), found {text.count(old)}")
open(path, "w").write(text.replace(old, new))
EOF
}

install() {
  local py
  py=$(command -v "$UP_PYTHON") || { echo "no interpreter $UP_PYTHON" >&2; exit 1; }
  ls "$UP_WHEELS"/*.whl > /dev/null 2>&1 || { echo "no wheels in $UP_WHEELS: run '$0 fetch' here and carry it" >&2; exit 1; }
  rm -rf "$UP_SITE"
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$UP_SITE" "$UP_WHEELS"/*.whl >&2
  write_perth_stub
  patch_norm_loudness "$py"
  if [ "${UP_NUMBA_STUB:-0}" = 1 ] || ! (cd / && PYTHONPATH=$UP_SITE "$py" -c "import numba" > /dev/null 2>&1); then
    echo "numba does not import here (or UP_NUMBA_STUB=1): using the numba stub" >&2
    write_numba_stub
  fi
  mkdir -p "$UP_ENV/bin"
  # exec the image's interpreter itself (its own site-packages stay), with only UP_SITE added
  printf '#!/bin/sh\nPYTHONPATH=%s PYTHONNOUSERSITE=1 exec %s "$@"\n' "$UP_SITE" "$py" > "$UP_ENV/bin/python"
  chmod +x "$UP_ENV/bin/python"
  # import check from a neutral directory, so that no checkout's chatterbox can be picked up
  (cd / && UP_SITE=$UP_SITE "$UP_ENV/bin/python" - <<'EOF') >&2
import importlib.metadata as md
import chatterbox, chatterbox.tts_turbo  # noqa: F401  (upstream's, the whole import chain)
import os
import perth
assert chatterbox.__file__.startswith(os.environ["UP_SITE"]), f"wrong chatterbox: {chatterbox.__file__}"
import numba
names = ("chatterbox-tts", "torch", "torchaudio", "numpy", "transformers", "diffusers", "librosa",
         "huggingface-hub", "safetensors", "tokenizers")
print("upstream side environment: " + ", ".join(f"{n} {md.version(n)}" for n in names)
      + f", numba {numba.__version__}; perth stub: {getattr(perth, 'STUB', False)}; chatterbox from {chatterbox.__file__}")
EOF
  echo "$UP_ENV"
}

case "${1:-install}" in
  fetch) fetch ;;
  install) install ;;
  *) echo "usage: $0 [fetch | install]" >&2; exit 2 ;;
esac
