#!/usr/bin/env bash
# The first GPU's one call: the gpu test tier, Table 1 fits per GPU-hour (one trial, then 1/2/4/8 trials sharing
# the card) and the KAN fit step on CUDA against the independent baseline and the floor. At most GPU_CHECK_SECONDS
# (default 570) in all: each step runs under its own limit, cut to what the budget has left (a step with under 10 s
# left is skipped, and the script says so), so a caller with a 10-minute limit gets the script's own end. Every
# result lands in benchmarks/results/, and in $OUT too when that is set, copied after each step (a run cut off from
# outside still leaves the steps finished so far there).
#
#     bash benchmarks/gpu_check.sh            # from the repository root, on a machine with CUDA
#
# Where torch sees no CUDA device it says so and exits 2 at once, having run nothing. The interpreter: $PYTHON,
# else the checkout's .venv/bin/python, else python; one that cannot import torch is named (exit 3), not taken
# for a machine without CUDA.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RESULTS=benchmarks/results
LOG=$RESULTS/gpu_check.log

if ! "$PY" -c 'import torch' 2>/dev/null; then
    echo "gpu_check: '$PY' cannot import torch: nothing run; set PYTHON to the project's interpreter" >&2
    exit 3
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False): nothing run; run it on a GPU machine" >&2
    exit 2
fi

DEADLINE=$(($(date +%s) + ${GPU_CHECK_SECONDS:-570}))
FILES="$LOG $RESULTS/gpu_tests.xml $RESULTS/gpu_table1_cuda.json $RESULTS/gpu_table1_shared_cuda.json
    $RESULTS/fit_step_cuda.json"
mkdir -p "$RESULTS"
rm -f $FILES  # an earlier run's: what is published below is this run's alone
: > "$LOG"
status=0
publish() {  # what exists so far, into $OUT
    [ -n "${OUT:-}" ] || return 0
    for f in $FILES; do [ -f "$f" ] && cp "$f" "$OUT"/; done
    return 0
}
step() {  # step NAME SECONDS COMMAND...: run it under its limit (cut to the budget left), log it, remember a failure
    local name=$1 limit=$2
    shift 2
    local left=$((DEADLINE - $(date +%s) - 15))  # 15 s for the kill's grace and the copies
    if [ "$left" -lt 10 ]; then
        echo "=== $name: skipped, the budget (GPU_CHECK_SECONDS=${GPU_CHECK_SECONDS:-570}) is spent" | tee -a "$LOG"
        status=1
        return
    fi
    [ "$left" -lt "$limit" ] && limit=$left
    echo "=== $name ($(date +%T), limit ${limit}s): $*" | tee -a "$LOG"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc" | tee -a "$LOG"
    [ "$rc" -eq 0 ] || status=1
    publish
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

verdict='all steps passed'
[ $status -eq 0 ] || verdict='a step failed or was skipped: see the log'
echo "gpu_check: $verdict ($LOG)" | tee -a "$LOG"
publish
exit $status
