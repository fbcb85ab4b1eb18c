"""Container images the components run in, fixed when the pipeline is compiled.

``make compile REGISTRY=... TAG=...`` (or the ``QLORA_KFP_CPU_IMAGE``/``QLORA_KFP_GPU_IMAGE``
environment variables, which may carry an ``@sha256:`` digest) picks them; the defaults are
what ``make images`` builds and what the committed golden YAML names.
"""

from qlora_kfp import env

REGISTRY = env.text("QLORA_KFP_REGISTRY")
TAG = env.text("QLORA_KFP_TAG")
CPU_IMAGE = env.text("QLORA_KFP_CPU_IMAGE")  # default: {REGISTRY}/qlora-kfp-cpu:{TAG}
GPU_IMAGE = env.text("QLORA_KFP_GPU_IMAGE")  # default: {REGISTRY}/qlora-kfp-gpu:{TAG}
