"""Container images the components run in, fixed when the pipeline is compiled.

``make compile REGISTRY=... TAG=...`` (or the ``QLORA_KFP_CPU_IMAGE``/``QLORA_KFP_GPU_IMAGE``
environment variables, which may carry an ``@sha256:`` digest) picks them; the defaults are
what ``make images`` builds and what the committed golden YAML names.
"""

import os

REGISTRY = os.environ.get("QLORA_KFP_REGISTRY", "ghcr.io/qlora-kfp")
TAG = os.environ.get("QLORA_KFP_TAG", "0.1.0")
CPU_IMAGE = os.environ.get("QLORA_KFP_CPU_IMAGE", f"{REGISTRY}/qlora-kfp-cpu:{TAG}")
GPU_IMAGE = os.environ.get("QLORA_KFP_GPU_IMAGE", f"{REGISTRY}/qlora-kfp-gpu:{TAG}")
