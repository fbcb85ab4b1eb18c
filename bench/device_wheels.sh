#!/usr/bin/env bash
# Fills .whl/ (git-excluded) with the wheels a lent GPU machine lacks, for Python 3.12 on
# x86-64: bitsandbytes (slimmed to its CPU and CUDA 13 libraries: the full wheel's 43 MB of
# CUDA 11/12 and ROCm builds alone would use most of a call's 64 MiB), liger-kernel, datasets,
# trl (bench/trl_peer.py; pure Python, its other needs are in the image or in this list),
# pytest, and what running the pipeline through kfp.local needs (kfp, mlflow-skinny with its
# SQLite store, and their needs that the machine's image does not hold; see the device tool's
# KINDS.md for the image's list). Run here, in the repository root: bash bench/device_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
mkdir -p .whl
PY=${PYTHON:-python3}
PLAT=(--python-version 3.12 --implementation cp --only-binary=:all:)
for n in 17 24 27 28 31 34; do PLAT+=(--platform "manylinux_2_${n}_x86_64"); done
PLAT+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)

# Training and evaluation (bench/run_device.sh, bench/gpu_stages.py).
TRAIN=(bitsandbytes==0.50.2 liger-kernel==0.8.5 datasets==5.2.0 dill==0.4.1
  multiprocess==0.70.19 nltk==3.10.4 defusedxml==0.7.1 pytest==9.2.0 pluggy==1.7.0
  iniconfig==2.3.1 pygments==2.21.0 trl==1.16.0
  transformers==5.23.0)  # the image has 5.17: prepare uses 5.23's chat-template helpers
# The pipeline through kfp.local (bench/run_pipeline_gpu.sh).
PIPELINE=(kfp==2.17.0 kfp-kubernetes==2.17.0 kfp-pipeline-spec==2.17.3 kubernetes==37.0.1
  google-cloud-storage==3.17.1 google-api-core==2.44.0 google-auth==2.62.2
  google-cloud-core==2.8.0 google-crc32c==1.9.0 google-resumable-media==2.11.0
  googleapis-common-protos==1.76.0 proto-plus==1.29.0 protobuf==6.33.6 durationpy==0.11
  websocket-client==1.9.2 requests-oauthlib==2.0.0 oauthlib==4.0.1 docstring-parser==0.18.0
  requests-toolbelt==1.0.0 click-option-group==0.5.9 cachetools==7.3.2 pyasn1==0.6.5
  pyasn1-modules==0.4.2 cryptography==50.0.2 cffi==2.1.1 pycparser==3.12
  mlflow-skinny==3.17.2 mlflow-tracing==3.17.2 databricks-sdk==0.156.0
  opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-proto==1.45.2
  opentelemetry-semantic-conventions==0.66b2 importlib-metadata==9.1.0 sqlparse==0.6.1
  gitpython==3.2.1 gitdb==4.0.12 smmap==5.0.3 python-dotenv==1.2.4 pydantic==2.14.3
  pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 fastapi==0.165.0
  starlette==1.10.0 uvicorn==0.54.0 alembic==1.20.1 mako==1.4.3 sqlalchemy==2.1.9)
"$PY" -m pip download -q --no-deps "${PLAT[@]}" -d .whl "${TRAIN[@]}" "${PIPELINE[@]}"
# PyPI has only sdists of these two (pure Python): build their wheels here.
"$PY" -m pip wheel -q --no-deps -w .whl kfp-server-api==2.17.3 rouge-score==0.1.2

# bitsandbytes: keep the CPU and CUDA 13 libraries (the GPU image runs CUDA 13).
"$PY" - <<'EOF'
import glob, zipfile, os, re
src = glob.glob(".whl/bitsandbytes-*.whl")[0]
if os.path.getsize(src) > 20e6:
    keep = re.compile(r"libbitsandbytes_(cpu|cuda13\d)\.so$")
    tmp = src + ".slim"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
        for item in zin.infolist():
            name = item.filename
            if name.endswith(".so") and not keep.search(name):
                continue
            data = zin.read(name)
            if name.endswith("/RECORD"):  # drop the rows of the files left out
                rows = data.decode().splitlines()
                rows = [r for r in rows if not (r.split(",")[0].endswith(".so") and not keep.search(r.split(",")[0]))]
                data = ("\n".join(rows) + "\n").encode()
            zout.writestr(item, data)
    os.replace(tmp, src)
EOF
du -sh .whl
