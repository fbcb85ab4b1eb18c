"""Where tasks run: resources, GPU node pools, secrets, shm, scratch disk, retries, caching.

The one place for pod settings. Which GPUs and which node pool are run parameters
(``gpu_accelerator``, ``gpu_node_selector``, ``gpu_tolerations`` in ``PipelineConfig``), so one
uploaded pipeline serves several GPU pools. The rest is fixed at compile time from the
environment (``make compile`` passes it through): ``QLORA_KFP_GPUS``, ``QLORA_KFP_SECRET``,
``QLORA_KFP_CONFIGMAP``, ``QLORA_KFP_CACHE_PVC``, ``QLORA_KFP_SHM_SIZE``,
``QLORA_KFP_SCRATCH_SIZE``, ``QLORA_KFP_GPU_RETRIES`` and ``QLORA_KFP_RETRY_WINDOW``, whose
defaults and meanings are in ``qlora_kfp/env.py`` (and the README's environment table).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kfp import dsl, kubernetes

from qlora_kfp import env
from qlora_kfp.preflight import GPUS_ENV
from qlora_kfp.tasks.context import RUN_ID_ENV

# kubeflow/pipelines backend/src/common/util/consts.go LabelKeyWorkflowRunId, set on every pod
# of a run by backend/src/apiserver/template/v2_template.go (SetPodMetadataLabels).
RUN_ID_LABEL = "pipeline/runid"
SCRATCH = "/scratch"
# Credentials come from the Secret as env vars, never as pipeline parameters. {key: env var}.
# MLflow's own variables reach the container under the names of
# qlora_kfp/tasks/__init__.py's PLUGIN_VARS: KFP 2.17's MLflow plugin injects MLFLOW_* itself
# as plain values (backend/src/v2/common/plugins/mlflow/handler.go RetrieveUserContainerEnvVars)
# in the driver's pod-spec patch, which Argo merges into the container by name: one of ours
# from a Secret under the same name would become one EnvVar with value and valueFrom, and
# Kubernetes refuses the pod. The task adopts ours only where the plugin injected none.
SECRET_KEYS = {
    "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
    "MLFLOW_TRACKING_USERNAME": "QLORA_KFP_MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD": "QLORA_KFP_MLFLOW_TRACKING_PASSWORD",
    "HF_TOKEN": "HF_TOKEN",
    "QLORA_KFP_WEBHOOK_URL": "QLORA_KFP_WEBHOOK_URL",  # Slack-compatible; a URL is a secret
}
CONFIG_KEYS = {
    "MLFLOW_TRACKING_URI": "QLORA_KFP_MLFLOW_TRACKING_URI",
    **{
        k: k
        for k in (
            "MLFLOW_S3_ENDPOINT_URL",
            "AWS_ENDPOINT_URL",
            "AWS_DEFAULT_REGION",
            "QLORA_KFP_ARTIFACT_URI",
            "KFP_UI_URL",
        )
    },
}


def _text(name: str) -> str:
    return field(default_factory=lambda: env.text(name))


def _integer(name: str) -> int:
    return field(default_factory=lambda: env.integer(name))


@dataclass(frozen=True)
class PlatformOptions:
    """The compile-time settings, each from its variable (defaults: ``qlora_kfp/env.py``)."""

    gpus: int = _integer("QLORA_KFP_GPUS")
    secret: str = _text("QLORA_KFP_SECRET")
    config_map: str = _text("QLORA_KFP_CONFIGMAP")
    cache_pvc: str = _text("QLORA_KFP_CACHE_PVC")
    shm_size: str = _text("QLORA_KFP_SHM_SIZE")
    scratch_size: str = _text("QLORA_KFP_SCRATCH_SIZE")
    gpu_retries: int = _integer("QLORA_KFP_GPU_RETRIES")
    retry_window: str = _text("QLORA_KFP_RETRY_WINDOW")


def _common(task: dsl.PipelineTask, cache: bool, opts: PlatformOptions) -> dsl.PipelineTask:
    task.set_caching_options(cache)
    # optional: a cluster without MLflow auth or S3 keys (IRSA/Workload Identity) still runs.
    kubernetes.use_secret_as_env(task, opts.secret, SECRET_KEYS, optional=True)
    kubernetes.use_config_map_as_env(task, opts.config_map, CONFIG_KEYS, optional=True)
    task.set_env_variable("HF_HUB_DISABLE_TELEMETRY", "1")
    # GPUs per GPU task: preflight's memory estimate counts DDP's share for that many.
    task.set_env_variable(GPUS_ENV, str(opts.gpus))
    # The run id from the pod's label (every pod of a KFP run has it): cached tasks cannot take
    # it as an input, since the backend's cache key holds every input value (tasks/context.py).
    kubernetes.use_field_path_as_env(task, RUN_ID_ENV, f"metadata.labels['{RUN_ID_LABEL}']")
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


def gpu_task(
    task: dsl.PipelineTask, cache: bool, params: dict, opts: PlatformOptions | None = None
):
    """GPU stages: the run's GPU and node pool, shm, a scratch disk for downloads, retries.

    Args:
        task: The task to place.
        cache: Whether the backend may reuse an earlier run's outputs.
        params: The pipeline's parameters: ``gpu_accelerator``, ``gpu_node_selector`` and
            ``gpu_tolerations`` are read per run (the driver resolves them from the run's
            inputs: backend/src/v2/driver/k8s.go, driver.go, since 2.14).
        opts: Compile-time options (default: from the environment).
    """
    opts = opts or PlatformOptions()
    _common(task, cache, opts)
    task.set_cpu_request("4").set_memory_request("32Gi").set_memory_limit("64Gi")
    task.set_accelerator_type(params["gpu_accelerator"]).set_accelerator_limit(opts.gpus)
    # kfp 2.17 compiles the accelerator placeholder into the task's inputs but, inside a
    # dsl.If or ParallelFor, leaves it out of the enclosing DAG's inputs, where the driver
    # resolves it (it would fail: "parent DAG does not have input parameter"). Registering the
    # channel makes the compiler carry it through (tests/pipelines/test_platform.py checks the path).
    task.register_pipeline_channels([params["gpu_accelerator"]])
    kubernetes.add_node_selector_json(task, params["gpu_node_selector"])
    kubernetes.add_toleration_json(task, params["gpu_tolerations"])
    kubernetes.empty_dir_mount(task, "dshm", "/dev/shm", medium="Memory", size_limit=opts.shm_size)
    if opts.scratch_size:
        # Model downloads (a 16-bit 70B checkpoint is 140 GB) go to a scratch disk of a
        # declared size instead of the container's writable layer. An emptyDir: a generic
        # ephemeral volume would be root-owned and KFP sets no pod fsGroup (driver/k8s.go), so
        # the non-root task could not write it. KFP has no per-task ephemeral-storage request
        # (kfp-kubernetes KubernetesExecutorConfig); the namespace's LimitRange gives every
        # container a default one (manifests/base/quota.yaml).
        kubernetes.empty_dir_mount(task, "scratch", SCRATCH, size_limit=opts.scratch_size)
        if not opts.cache_pvc:
            task.set_env_variable("QLORA_KFP_CACHE", f"{SCRATCH}/qlora-kfp")
            task.set_env_variable("HF_HOME", f"{SCRATCH}/huggingface")
    # backoff_max_duration becomes Argo's retryStrategy.backoff.maxDuration (KFP
    # v2/compiler/argocompiler/container.go), which is not a cap on the wait between attempts:
    # Argo (workflow/controller/operator.go processNodeRetries) stops retrying once that long
    # has passed since the FIRST attempt started, and gives every attempt's pod that moment as
    # its deadline. At 600 s a train that failed after 9 minutes was never retried and a retry
    # was killed 10 minutes after the first attempt began. So the window covers every attempt
    # of the longest stage. KFP sets no retryPolicy, so Argo's default (OnFailure) applies: a
    # pod that fails is retried, a pod deleted outright (node gone) is an Error and is not.
    task.set_retry(
        opts.gpu_retries,
        backoff_duration="60s",
        backoff_factor=2,
        backoff_max_duration=opts.retry_window,
    )
    return task
