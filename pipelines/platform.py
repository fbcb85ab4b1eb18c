"""Where tasks run: resources, GPU node pools, secrets, shm, retries, caching.

The one place for pod settings. Options are fixed at compile time from the environment
(``make compile`` passes them through), so one codebase compiles for GKE, EKS or on-prem:

==============================  =========================================================
``QLORA_KFP_ACCELERATOR``       resource name of the GPU (``nvidia.com/gpu``)
``QLORA_KFP_GPUS``              GPUs per GPU task (1)
``QLORA_KFP_GPU_NODE_LABEL``    node selector ``key=value`` (``nvidia.com/gpu.present=true``)
``QLORA_KFP_GPU_TOLERATION``    taint to tolerate, ``key[=value]:Effect`` (``nvidia.com/gpu:NoSchedule``)
``QLORA_KFP_SECRET``            Secret with credentials, as env (``qlora-kfp-credentials``)
``QLORA_KFP_CONFIGMAP``         ConfigMap with endpoints, as env (``qlora-kfp-config``)
``QLORA_KFP_CACHE_PVC``         PVC mounted at /cache for the model cache ("" = none)
``QLORA_KFP_SHM_SIZE``          size of the memory-backed /dev/shm (``16Gi``)
``QLORA_KFP_GPU_RETRIES``       retries of GPU tasks, e.g. after preemption (3)
==============================  =========================================================
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from kfp import dsl, kubernetes

# Credentials come from the Secret as env vars, never as pipeline parameters.
SECRET_KEYS = {
    "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
    "MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD",
    "HF_TOKEN": "HF_TOKEN",
    "QLORA_KFP_WEBHOOK_URL": "QLORA_KFP_WEBHOOK_URL",  # Slack-compatible; a URL is a secret
}
CONFIG_KEYS = {
    k: k
    for k in (
        "MLFLOW_TRACKING_URI",
        "MLFLOW_S3_ENDPOINT_URL",
        "AWS_ENDPOINT_URL",
        "AWS_DEFAULT_REGION",
        "QLORA_KFP_ARTIFACT_URI",
        "KFP_UI_URL",
    )
}


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


@dataclass(frozen=True)
class PlatformOptions:
    accelerator: str = field(
        default_factory=lambda: _env("QLORA_KFP_ACCELERATOR", "nvidia.com/gpu")
    )
    gpus: int = field(default_factory=lambda: int(_env("QLORA_KFP_GPUS", "1")))
    gpu_node_label: str = field(
        default_factory=lambda: _env("QLORA_KFP_GPU_NODE_LABEL", "nvidia.com/gpu.present=true")
    )
    gpu_toleration: str = field(
        default_factory=lambda: _env("QLORA_KFP_GPU_TOLERATION", "nvidia.com/gpu:NoSchedule")
    )
    secret: str = field(default_factory=lambda: _env("QLORA_KFP_SECRET", "qlora-kfp-credentials"))
    config_map: str = field(default_factory=lambda: _env("QLORA_KFP_CONFIGMAP", "qlora-kfp-config"))
    cache_pvc: str = field(default_factory=lambda: _env("QLORA_KFP_CACHE_PVC", ""))
    shm_size: str = field(default_factory=lambda: _env("QLORA_KFP_SHM_SIZE", "16Gi"))
    gpu_retries: int = field(default_factory=lambda: int(_env("QLORA_KFP_GPU_RETRIES", "3")))


def _common(task: dsl.PipelineTask, cache: bool, opts: PlatformOptions) -> dsl.PipelineTask:
    task.set_caching_options(cache)
    # optional: a cluster without MLflow auth or S3 keys (IRSA/Workload Identity) still runs.
    kubernetes.use_secret_as_env(task, opts.secret, SECRET_KEYS, optional=True)
    kubernetes.use_config_map_as_env(task, opts.config_map, CONFIG_KEYS, optional=True)
    task.set_env_variable("HF_HUB_DISABLE_TELEMETRY", "1")
    # The task knows its own image: part of the cache fingerprint (qlora_kfp.storage.fingerprint).
    task.set_env_variable("QLORA_KFP_IMAGE", task.component_spec.implementation.container.image)
    if opts.cache_pvc:
        kubernetes.mount_pvc(task, opts.cache_pvc, "/cache")
        task.set_env_variable("QLORA_KFP_CACHE", "/cache/qlora-kfp")
        task.set_env_variable("HF_HOME", "/cache/huggingface")
    return task


def small_task(task: dsl.PipelineTask, cache: bool, opts: PlatformOptions | None = None):
    """Bookkeeping tasks (tracking, registry): a quarter core."""
    _common(task, cache, opts or PlatformOptions())
    task.set_cpu_request("250m").set_memory_request("512Mi").set_memory_limit("2Gi")
    return task


def cpu_task(task: dsl.PipelineTask, cache: bool, opts: PlatformOptions | None = None):
    """CPU-only stages (dataset preparation)."""
    _common(task, cache, opts or PlatformOptions())
    task.set_cpu_request("2").set_memory_request("8Gi").set_memory_limit("16Gi")
    return task


def gpu_task(task: dsl.PipelineTask, cache: bool, opts: PlatformOptions | None = None):
    """GPU stages: accelerator, GPU node pool, shm for data loaders, retries on preemption."""
    opts = opts or PlatformOptions()
    _common(task, cache, opts)
    task.set_cpu_request("4").set_memory_request("32Gi").set_memory_limit("64Gi")
    task.set_accelerator_type(opts.accelerator).set_accelerator_limit(opts.gpus)
    if opts.gpu_node_label:
        key, _, value = opts.gpu_node_label.partition("=")
        kubernetes.add_node_selector(task, key, value)
    if opts.gpu_toleration:
        kv, _, effect = opts.gpu_toleration.partition(":")
        key, _, value = kv.partition("=")
        kubernetes.add_toleration(
            task,
            key=key,
            operator="Equal" if value else "Exists",
            value=value or None,
            effect=effect or "NoSchedule",
        )
    kubernetes.empty_dir_mount(task, "dshm", "/dev/shm", medium="Memory", size_limit=opts.shm_size)
    task.set_retry(
        opts.gpu_retries, backoff_duration="60s", backoff_factor=2, backoff_max_duration="600s"
    )
    return task
