#!/usr/bin/env bash
# Runs a benchmark on a lent GPU machine (the device tool), in one call, so the baseline and
# the project's variants share the machine. Needs the wheels in .whl/ (make device-wheels:
# bitsandbytes, liger-kernel, pytest, ...). BENCH picks the script (train_bench.py, the 8B
# recipe comparison, by default; bench_70b.py for 70B shapes); its arguments follow.
# The GPU-only tests run first (SKIP_GPU_TESTS=1 skips them); their failures are reported,
# and the benchmark still runs.
set -euo pipefail
BENCH=${BENCH:-train_bench.py}
OUT=${OUT:-.}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ -z "${SKIP_GPU_TESTS:-}" ]; then
  python3 -m pytest -q -p no:cacheprovider -m gpu tests/training/test_attention.py \
    tests/training/test_lora_dropout.py tests/training/test_fp8_base.py \
    tests/training/test_fp8_kernels.py tests/training/test_modeling.py tests/training/test_lora_inputs.py \
    tests/training/test_checkpointing.py \
    tests/training/test_gpu_training.py >"$OUT/gpu_tests.log" 2>&1 \
    || echo "GPU TESTS FAILED (see gpu_tests.log)"
  grep -E "passed|failed|error|FAILED|Error" "$OUT/gpu_tests.log" | tail -12
fi
python3 "bench/$BENCH" --out "$OUT" "$@" 2>&1 | tee "$OUT/${BENCH%.py}.log" | \
  grep -v -E "it/s\]|s/it\]|Warning|warn\(|^\s*$|Loading weights|Writing model"
