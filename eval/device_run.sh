#!/usr/bin/env bash
# One call on a lent GPU machine (the device tool runs this from the repo root; results go to $OUT).
#
#   bash eval/device_run.sh tests [FILE ...]              # pytest -m gpu (all of tests/, or these files;
#                                                         # the whole set needs more than one 10-minute call:
#                                                         # tests/test_engine.py, then --ignore=tests/test_engine.py tests)
#   bash eval/device_run.sh regression OLD_TREE OLD_SHA NEW_SHA   # eval.regression, old then new, one machine
#   bash eval/device_run.sh serve-bench NEW_SHA           # streams per GPU (batching + scheduling on)
#   bash eval/device_run.sh all OLD_TREE OLD_SHA NEW_SHA  # the three, in that order
#
# Before the call, here: `bash ../shared/tools/device_wheels.sh` (librosa, soundfile, soxr, ... into
# .whl) and, for a regression, the old tree: `git archive OLD_SHA src eval | tar -x -C .regress/old`;
# carry .whl and .regress. The image has torch, torchaudio and triton.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed" >&2; exit 1; }
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

run_tests() {
  local files=("$@"); [ ${#files[@]} -gt 0 ] || files=(tests)
  local log="$OUT/gpu-tests-$(printf '%s' "${files[*]}" | tr -c 'A-Za-z0-9' '_').log"
  timeout 540 python3 -m pytest -m gpu -q -p no:cacheprovider -rfE --timeout 300 "${files[@]}" 2>&1 | tee "$log" | tail -30
}
run_regression() {
  python3 -m eval.regression run --tree "$1" --label old --commit "$2" --out "$OUT/old" --reps 3 &&
  python3 -m eval.regression run --tree . --label new --commit "$3" --out "$OUT/new" --reps 3 &&
  python3 -m eval.regression merge --old "$OUT/old" --new "$OUT/new" --out "$OUT/h100-engine-regression"
}
run_serve_bench() {
  python3 -m eval.serve_bench --device cuda --opt "fast+t3_batching=1+s3gen_scheduling=1" --s3gen-batch 8 \
    --streams 1,8,16,32,64,128 --requests 2 --commit "$1" --out "$OUT/h100-serve-bench"
}

case "${1:-}" in
  tests) shift; run_tests "$@" ;;
  regression) run_regression "$2" "$3" "$4" ;;
  serve-bench) run_serve_bench "$2" ;;
  all) run_tests; run_regression "$2" "$3" "$4"; run_serve_bench "$4" ;;
  *) echo "usage: $0 tests | regression OLD_TREE OLD_SHA NEW_SHA | serve-bench NEW_SHA | all ..." >&2; exit 2 ;;
esac
