#!/usr/bin/env bash
# The whole pipeline through kfp.local on a lent GPU machine (bench/pipeline_gpu.py): every
# stage's wall time and peak memory. .whl/ comes from bench/device_wheels.sh; the project is
# installed without dependencies (the image holds torch, transformers, peft, accelerate), so
# the components' `from qlora_kfp import ...` resolves as in the project image.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
  --target /tmp/site-project .
export PYTHONPATH=/tmp/site-project:/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
  TOKENIZERS_PARALLELISM=false MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
python3 -c "import kfp, mlflow, bitsandbytes, torch; print('kfp', kfp.__version__, 'mlflow', \
mlflow.__version__, 'bitsandbytes', bitsandbytes.__version__, 'torch', torch.__version__)"
python3 bench/pipeline_gpu.py --out "${OUT:-.}" "$@" 2>&1 | tee "${OUT:-.}/pipeline_gpu.log" | \
  grep -v -E "it/s\]|s/it\]|Warning|warn\("
