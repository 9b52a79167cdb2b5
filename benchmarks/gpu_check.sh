#!/usr/bin/env bash
# The first GPU's one call: the gpu test tier, Table 1 fits per GPU-hour (one trial, then 1/2/4/8 trials sharing
# the card) and the KAN fit step on CUDA against the independent baseline and the floor. About 10 minutes on one
# GPU; every result lands in benchmarks/results/ (and in $OUT too, when that is set).
#
#     bash benchmarks/gpu_check.sh            # from the repository root, on a machine with CUDA
#
# Where torch sees no CUDA device it says so and exits 2 at once, having run nothing.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RESULTS=benchmarks/results
LOG=$RESULTS/gpu_check.log

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False): nothing run; run it on a GPU machine" >&2
    exit 2
fi

mkdir -p "$RESULTS"
: > "$LOG"
status=0
step() {  # step NAME SECONDS COMMAND...: run it under a time limit, log it, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date +%T), limit ${limit}s): $*" | tee -a "$LOG"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc" | tee -a "$LOG"
    [ "$rc" -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG"
step "gpu test tier" 200 env FEWSOUND_TEST_GPU=1 "$PY" -m pytest -q -m gpu tests/test_gpu.py -rs \
    --junitxml="$RESULTS/gpu_tests.xml"
step "table 1, one trial per GPU" 150 "$PY" benchmarks/gpu_table1.py --device cuda --packs 1,8,32 --steps 5 \
    --out "$RESULTS/gpu_table1_cuda.json"
step "table 1, 1/2/4/8 trials per GPU" 240 "$PY" benchmarks/gpu_table1.py --device cuda --packs "" \
    --trials-per-gpu 1,2,4,8 --trial-families kan,wire --trial-pack 16 --steps 10 \
    --out "$RESULTS/gpu_table1_shared_cuda.json"
step "KAN fit step on CUDA" 100 "$PY" benchmarks/fit_step.py --device cuda --threads 1 --packs 1,8,32 \
    --steps 5 --rounds 2 --variants bf16 --variant-packs 8 --out "$RESULTS/fit_step_cuda.json"

if [ -n "${OUT:-}" ]; then
    cp "$LOG" "$RESULTS"/gpu_tests.xml "$RESULTS"/gpu_table1_cuda.json "$RESULTS"/gpu_table1_shared_cuda.json \
        "$RESULTS"/fit_step_cuda.json "$OUT"/ 2>/dev/null
fi
echo "gpu_check: $([ $status -eq 0 ] && echo 'all steps passed' || echo 'a step failed: see the log') ($LOG)"
exit $status
