#!/usr/bin/env bash
# Runs the train-stage benchmark on a lent GPU machine (the device tool), in one call, so the
# baseline and the project's variants share the machine. Needs the wheels in .whl/ (see
# BENCHMARKS.md): bitsandbytes 0.50.2 and liger-kernel 0.8.5. Arguments go to train_bench.py.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# The GPU-only tests first (the varlen kernel against its reference); pytest comes from .whl/.
python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_attention.py 2>&1 | tail -3
python3 bench/train_bench.py --out "${OUT:-.}" "$@" 2>&1 | tee "${OUT:-.}/bench.log" | \
  grep -v -E "it/s\]|s/it\]|Warning|warn\(" 
