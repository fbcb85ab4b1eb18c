#!/usr/bin/env bash
# Every stage once on a lent GPU machine (bench/gpu_stages.py): wall time and peak memory.
# Needs in .whl/: bitsandbytes 0.50.2, liger-kernel 0.8.5, datasets 5.2.0, dill, multiprocess,
# nltk, defusedxml and a rouge_score wheel (`pip wheel --no-deps rouge_score==0.1.2`: PyPI has
# only its sdist); .whl/fallback/ holds datasets 4.4.1 for an image whose pyarrow is < 24.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -c "import pyarrow, transformers, torch; print('pyarrow', pyarrow.__version__, \
'transformers', transformers.__version__, 'torch', torch.__version__)"
if ! python3 -c "import datasets" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-fb \
    .whl/fallback/*.whl
  export PYTHONPATH=/tmp/site-fb:$PYTHONPATH
fi
python3 bench/gpu_stages.py --out "${OUT:-.}" "$@" 2>&1 | tee "${OUT:-.}/gpu_stages.log" | \
  grep -v -E "it/s\]|s/it\]|Warning|warn\("
