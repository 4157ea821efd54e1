#!/usr/bin/env bash
# The GPU checks of a lent GPU machine, in one call (a lease is short and each start costs minutes).
#
#   OUT=out BUDGET=540 bash scripts/gpu_check.sh [steps...]
#
# Steps (default: all, in this order; each under its own time limit, cut to what is left of BUDGET
# seconds, and each runs even when an earlier one failed):
#   setup    carried wheels (.whl/: decord, av) into /tmp/site; the C++ extension built in place
#            with the machine's torch (stllm_engine.kernels is a link to kernels/ there). The lent
#            machine reaches no network and .whl/ is not in git: before the run, on this side,
#              pip download decord av --only-binary=:all: --no-deps --python-version 3.12 \
#                  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl
#            (its Python's version: 3.12 on the last H100 image) and pass carry [".whl"]
#   engine   tests/test_engine_cuda.py: the engine on the GPU vs the reference on the GPU
#   e2e      benchmarks/e2e.py --preset stllm-7b --device cuda --dtype bfloat16 (random ST-LLM-7B)
#   e2e720   the same on the 1280x720 clips
#   e2eres   (not in the default list) the same on conversation_weight's workload: global-local
#            input, 64 frames (--video-input residual; writes a second random 7B checkpoint)
#   e2ebt    (not in the default list) the same on qa_weight's: BT-Adapter, 16 frames all
#   triton   the Triton kernel tests compiled (STLLM_TEST_TRITON_COMPILED=1, bf16 included)
#   kernels  benchmarks/kernels.py --no-cpu (GPU rows)
#   profile  benchmarks/profile_e2e.py --device cuda at the 7B shape (torch at nproc threads):
#            both sides' stages, the decode step's parts and the prefills' GPU op tables
#   frames   benchmarks/frames.py --device cuda: the engine's decode (PyAV where exact, runs on the
#            engine's decode threads) and decord's on several readers vs one decord reader,
#            preprocessing on the GPU vs the CPU
# Writes $OUT/log.txt (every step's output) and the result JSON files to $OUT. E2E_ARGS: more
# arguments for e2e.py (e.g. "--repeats 5").
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
BUDGET=${BUDGET:-540}
PY=${PY:-python3}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
START=$(date +%s)
export PYTHONUNBUFFERED=1
STEPS=${*:-setup engine e2e e2e720 triton kernels profile frames}

run_step() {  # name limit command...
    local name=$1 limit=$2 left rc t0
    shift 2
    left=$(( BUDGET - ($(date +%s) - START) ))
    (( limit > left )) && limit=$left
    if (( limit < 20 )); then echo "== $name: skipped, ${left}s of the budget left" | tee -a "$LOG"; return; fi
    echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
    t0=$(date +%s)
    timeout --signal=INT --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
    rc=$?
    echo "== $name: rc=$rc in $(( $(date +%s) - t0 ))s" | tee -a "$LOG"
}

setup() {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    $PY -c "import sys, torch, triton, transformers; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
    g++ --version | head -1
    if ls .whl/*.whl >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
    fi
    ln -sfn ../kernels stllm_engine/kernels
    MAX_JOBS=$(nproc) $PY setup.py -q build_ext --inplace || return 1
    $PY -c "import torch, stllm_engine._C, decord, av, stllm_engine.kernels.flash_attention; print('setup ok')"
}

export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
for s in $STEPS; do
    case $s in
        setup) run_step setup 240 bash -c "$(declare -f setup); PY=$PY; setup" ;;
        engine) run_step engine 150 env STLLM_TEST_CUDA=1 $PY -m pytest -q -x -p no:cacheprovider tests/test_engine_cuda.py ;;
        triton) run_step triton 150 env STLLM_TEST_TRITON_COMPILED=1 $PY -m pytest -q -p no:cacheprovider -n 8 \
                    tests/test_kernels_triton.py tests/test_kernels_triton_paged.py tests/test_kernels_triton_elementwise.py ;;
        e2e) run_step e2e 330 $PY benchmarks/e2e.py --preset stllm-7b --device cuda --dtype bfloat16 \
                 --out "$OUT/e2e-gpu-bfloat16.json" ${E2E_ARGS:-} ;;
        e2e720) run_step e2e720 240 $PY benchmarks/e2e.py --preset stllm-7b --device cuda --dtype bfloat16 \
                 --video 720p --out "$OUT/e2e-gpu-bfloat16-720p.json" ${E2E_ARGS:-} ;;
        e2eres) run_step e2eres 300 $PY benchmarks/e2e.py --preset stllm-7b --device cuda --dtype bfloat16 \
                 --video-input residual --out "$OUT/e2e-gpu-bfloat16-eva-residual.json" ${E2E_ARGS:-} ;;
        e2ebt) run_step e2ebt 300 $PY benchmarks/e2e.py --preset stllm-7b --device cuda --dtype bfloat16 \
                 --vit btadapter --out "$OUT/e2e-gpu-bfloat16-btadapter-all.json" ${E2E_ARGS:-} ;;
        kernels) run_step kernels 120 $PY benchmarks/kernels.py --no-cpu --out "$OUT/kernels-gpu.json" ;;
        profile) run_step profile 150 $PY benchmarks/profile_e2e.py --device cuda --preset stllm-7b \
                     --dtype bfloat16 --repeats 3 --threads "$(nproc)" --ops ;;
        frames) run_step frames 60 $PY benchmarks/frames.py --device cuda --out "$OUT/frames-gpu.json" ;;
        *) echo "unknown step $s" | tee -a "$LOG" ;;
    esac
done
echo "== total $(( $(date +%s) - START ))s" | tee -a "$LOG"
grep -E "^== |passed|failed|error|Error|same greedy|ttft|decode_tokens|requests_per_s|cached|chat_follow" "$LOG" | tail -n 60
