#!/usr/bin/env bash
# One call on a lent GPU machine (the device tool runs this from the repo root; results go to $OUT).
#
#   bash eval/device_run.sh tests [FILE ...]              # pytest -m gpu (all of tests/, or these files;
#                                                         # the whole set needs more than one 10-minute call:
#                                                         # tests/test_engine.py, then --ignore=tests/test_engine.py tests)
#   bash eval/device_run.sh regression OLD_TREE OLD_SHA NEW_SHA   # eval.regression, old then new, one machine
#   bash eval/device_run.sh serve-bench NEW_SHA           # streams per GPU (batching + scheduling on)
#   bash eval/device_run.sh all OLD_TREE OLD_SHA NEW_SHA  # the three, in that order
#   bash eval/device_run.sh tests-parallel                # pytest -m gpu as three processes at once
#                                                         # (engine / runners / kernels; one log each)
#   bash eval/device_run.sh serve-bench-http NEW_SHA      # a server (batching + scheduling) and the bench over HTTP
#   bash eval/device_run.sh turbo-serve-bench NEW_SHA     # streams per GPU for Chatterbox-Turbo
#   bash eval/device_run.sh turbo-ab NEW_SHA              # Turbo A/B (reference, fast) with pinned upstream
#                                                         # 0.1.7 beside it (eval/device_upstream.sh)
#
# Before the call, here: the wheels the image lacks, into .whl (the audio stack, pytest-timeout,
# pyloudnorm, and the server's packages pinned to CI's versions):
#   bash ../shared/tools/device_wheels.sh pytest-timeout pyloudnorm future fastapi==0.165.0 \
#     starlette==1.10.0 uvicorn==0.55.0 h11==0.16.0 anyio==4.16.0 sniffio==1.3.1 httpx==0.29.0 \
#     httpcore==1.0.9 idna==3.21 certifi==2026.10.19.post1 pydantic==2.14.4 pydantic_core==2.50.5 \
#     annotated-types==0.8.0 annotated-doc==0.0.7 typing-inspection==0.4.5 python-multipart==0.0.34 \
#     click==8.5.1 opentelemetry-api==1.45.2 prometheus_client==0.26.0
# and, for a regression, the old tree: `git archive OLD_SHA src eval | tar -x -C .regress/old`;
# carry .whl and .regress. For turbo-ab, upstream's wheels into .upwheels: `bash eval/device_upstream.sh
# fetch`; carry .whl and .upwheels. The image has torch, torchaudio, triton and matplotlib.
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

run_tests_parallel() {
  local core=(tests/test_engine.py) runners=(tests/test_t3_runner.py tests/test_turbo_runner.py tests/test_batch_bound.py
    tests/test_opt.py tests/test_shape_graphs.py)
  local rest=(tests) ignore=()
  for f in "${core[@]}" "${runners[@]}"; do ignore+=(--ignore="$f"); done
  local common=(-m gpu -q -p no:cacheprovider -rfE --timeout 400)
  timeout 540 python3 -m pytest "${common[@]}" "${core[@]}" > "$OUT/gpu-tests-engine.log" 2>&1 &
  timeout 540 python3 -m pytest "${common[@]}" "${runners[@]}" > "$OUT/gpu-tests-runners.log" 2>&1 &
  timeout 540 python3 -m pytest "${common[@]}" "${ignore[@]}" "${rest[@]}" > "$OUT/gpu-tests-kernels.log" 2>&1 &
  wait
  for log in "$OUT"/gpu-tests-*.log; do echo "== $log"; grep -E "passed|failed|skipped|FAILED|ERROR" "$log" | tail -12; done
}
run_serve_bench_http() {
  python3 -m chatterbox.serve.cli --device cuda --opt "fast+t3_batching=1+s3gen_scheduling=1" --s3gen-batch 8 \
    --max-concurrent 128 --max-queue 512 --no-watermark --port 8000 > "$OUT/server.log" 2>&1 &
  local server=$!
  for _ in $(seq 240); do
    python3 -c "import httpx; httpx.get('http://127.0.0.1:8000/health').raise_for_status()" 2>/dev/null && break
    sleep 1
  done
  python3 -m eval.serve_bench --http http://127.0.0.1:8000 --streams 1,16,64 --requests 2 --commit "$1" \
    --out "$OUT/h100-serve-bench-http"
  kill "$server"
}
run_turbo_serve_bench() {
  python3 -m eval.serve_bench --model turbo --device cuda --opt "fast+t3_batching=1+s3gen_scheduling=1" \
    --s3gen-batch 8 --streams 1,64,128,256 --requests 2 --commit "$1" --out "$OUT/h100-turbo-serve-bench"
}
run_turbo_ab() {
  # upstream's side environment (/tmp/upenv: the image's python3 + .upwheels, never our src/), then
  # the A/B; the upstream driver's own log comes back too
  { bash eval/device_upstream.sh &&
    timeout 540 python3 -m eval.ab --model turbo --device cuda --configs reference,fast --upstream /tmp/upenv \
      --reps 3 --commit "$1" --out "$OUT/h100-turbo-ab"; } 2>&1 | tee "$OUT/turbo-ab.log"
  local rc=${PIPESTATUS[0]}
  cp /tmp/upstream-turbo.log "$OUT/" 2>/dev/null
  return "$rc"
}

case "${1:-}" in
  tests) shift; run_tests "$@" ;;
  regression) run_regression "$2" "$3" "$4" ;;
  serve-bench) run_serve_bench "$2" ;;
  tests-parallel) run_tests_parallel ;;
  serve-bench-http) run_serve_bench_http "$2" ;;
  turbo-serve-bench) run_turbo_serve_bench "$2" ;;
  turbo-ab) run_turbo_ab "$2" ;;
  all) run_tests; run_regression "$2" "$3" "$4"; run_serve_bench "$4" ;;
  *) echo "usage: $0 tests | tests-parallel | regression OLD_TREE OLD_SHA NEW_SHA | serve-bench NEW_SHA | serve-bench-http NEW_SHA | turbo-serve-bench NEW_SHA | turbo-ab NEW_SHA | all ..." >&2
     exit 2 ;;
esac
