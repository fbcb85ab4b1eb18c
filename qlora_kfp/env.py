"""Every environment variable the project reads: its name, default, type and meaning.

``VARS`` is the one table. The code reads a variable only through the accessors here
(:func:`text`, :func:`integer`, :func:`path`, :func:`present`), which refuse a name that is
not in the table; ``tests/core/test_env.py`` fails on any other read of the environment in
``qlora_kfp/``, ``components/`` and ``pipelines/``, and the README's environment table is
generated from ``VARS`` (``make generate``).

Variables that belong to other tools (MLflow, boto3, torchrun, PyTorch, the KFP backend) are
listed too: with ``read=True`` where the project reads them itself, ``read=False`` where it
only passes them on and the tool reads them. Writes to ``os.environ`` (handing a setting to
MLflow or to a subprocess) are not reads and stay where they are.

Nothing here imports more than the standard library: every floor of the package reads it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from qlora_kfp.errors import ConfigError

PROJECT = "qlora-kfp"
# When a variable is read: {key: what the README says}.
WHEN = {
    "compile": "when a pipeline is compiled (`make compile`)",
    "client": "by `make upload`, `make run-remote` and `make schedule`",
    "task": "in a task (its pod, or under `make run`)",
}


@dataclass(frozen=True)
class Var:
    """One environment variable.

    Attributes:
        name: The variable.
        help: What it means, one line.
        default: The value when unset, as text ("" when none); ``{OTHER}`` stands for the
            value of the variable ``OTHER``, and a leading ``~`` of a :class:`Path` default is
            the home folder.
        type: What the value is read as: ``str``, ``int``, ``float`` or ``Path``.
        when: Where it is read: keys of :data:`WHEN`, comma-separated ("" when not by us).
        owner: Who defines it: :data:`PROJECT`, or the tool whose variable it is.
        read: Whether the project reads it; False: listed because the user sets it for
            ``owner``, which reads it.
        blank_is_unset: Whether a value of "" counts as unset (gives the default).
    """

    name: str
    help: str
    default: str = ""
    type: type = str
    when: str = "task"
    owner: str = PROJECT
    read: bool = True
    blank_is_unset: bool = False


_TABLE = [
    # The run's services: set for `make run` and the tasks (on a cluster from the Secret and
    # ConfigMap the pipelines name, see pipelines/platform.py).
    Var(
        "MLFLOW_TRACKING_URI",
        "tracking server (`make run` defaults to `sqlite:///runs/local/mlflow.db`); unset: "
        "tracking off",
        owner="MLflow",
    ),
    Var("MLFLOW_TRACKING_USERNAME", "MLflow auth: user", owner="MLflow", read=False, when=""),
    Var("MLFLOW_TRACKING_PASSWORD", "MLflow auth: password", owner="MLflow", read=False, when=""),
    Var("MLFLOW_TRACKING_TOKEN", "MLflow auth: bearer token", owner="MLflow", read=False, when=""),
    *[
        Var(
            f"QLORA_KFP_{name}",
            f"`{name}` as the pipelines hand it to a task: the task gives it that name unless "
            "KFP's MLflow plugin injected `MLFLOW_TRACKING_URI` (qlora_kfp/tasks/__init__.py)",
        )
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    ],
    Var(
        "QLORA_KFP_MLFLOW_ARTIFACT_ROOT",
        "artifact location of an experiment the pipeline creates (`make run` sets it beside its "
        "local store); unset: the server's default",
    ),
    *[
        Var(name, "S3 credentials (boto3's standard chain)", owner="boto3", read=False, when="")
        for name in (
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_PROFILE",
            "AWS_DEFAULT_REGION",
        )
    ],
    Var(
        "AWS_ENDPOINT_URL_S3",
        "S3-compatible endpoint (MinIO, Ceph), for S3 only; first of the three",
        owner="boto3",
    ),
    Var("AWS_ENDPOINT_URL", "S3-compatible endpoint (MinIO, Ceph)", owner="boto3"),
    Var(
        "MLFLOW_S3_ENDPOINT_URL",
        "S3-compatible endpoint, MLflow's name; used when neither `AWS_ENDPOINT_URL*` is set",
        owner="MLflow",
    ),
    Var(
        "QLORA_KFP_ARTIFACT_URI",
        "e.g. `s3://bucket/qlora`: every stage also uploads its artifact to "
        "`<uri>/<kfp-run-id>/<stage>/` (a sweep trial's under `<uri>/<kfp-run-id>/trial-<hash>/`)",
    ),
    Var(
        "QLORA_KFP_WEBHOOK_URL",
        "Slack-compatible webhook the exit handler posts the run summary to",
    ),
    Var(
        "KFP_UI_URL",
        "KFP UI base URL, for the link in the run report (and in what `make upload`, "
        "`run-remote` and `schedule` print; unset there: `KFP_HOST`)",
        when="task,client",
    ),
    Var(
        "QLORA_KFP_CACHE",
        "where `s3://` models and datasets are downloaded; an entry is keyed by the objects' "
        "ETag, size and LastModified (and VersionId), so an object replaced under the same key "
        "is downloaded again",
        default="~/.cache/qlora-kfp",
        type=Path,
        blank_is_unset=True,  # "" would be the current folder: downloads beside the user's files
    ),
    Var(
        "QLORA_KFP_CACHE_KEEP_DAYS",
        "days an older version of a replaced `s3://` source stays in the cache after its last "
        "use (`0`: removed as soon as a new version is downloaded); a shared cache PVC does not "
        "fill up with one copy per day of a daily dataset",
        default="7",
        type=float,
    ),
    Var(
        "HF_TOKEN",
        "Hugging Face token, for gated models",
        owner="Hugging Face",
        read=False,
        when="",
    ),
    Var(
        "HF_HUB_OFFLINE",
        "`1`: never contact the hub (`make` and `qlora-kfp run` set it unless it is set)",
        owner="Hugging Face",
        read=False,
        when="",
    ),
    # Set for a task by the compiled pipeline, the image or the backend: never by hand.
    Var(
        "KFP_RUN_ID",
        "the run a task belongs to: from the pod's `pipeline/runid` label on a cluster (set by "
        "the compiled pipeline), by `qlora-kfp run` under `kfp.local`; never set it yourself",
    ),
    Var(
        "KFP_RETRY_INDEX",
        "the attempt of a retried task (0: the first; KFP 2.17+); a retry after an error that "
        "fails the same way every time stops at once",
        default="0",
        type=int,
        owner="KFP backend",
    ),
    Var(
        "MLFLOW_RUN_ID",
        "the nested run KFP's MLflow plugin made for the task (`injectUserEnvVars`); the stages "
        "log into it",
        owner="KFP's MLflow plugin",
    ),
    Var(
        "MLFLOW_EXPERIMENT_ID",
        "the experiment KFP's MLflow plugin tracks the run in (read only with `MLFLOW_RUN_ID`)",
        owner="KFP's MLflow plugin",
    ),
    Var(
        "KFP_POD_NAME",
        "the task's own pod (KFP's compiler sets it on every task container: "
        "backend/src/v2/compiler/argocompiler/common.go, commonEnvs); the train task with "
        "`train_runner=trainjob` reads its pod to make the TrainJob's nodes like it",
        owner="KFP backend",
    ),
    Var(
        "KUBECONFIG",
        "the cluster a `train_runner=trainjob` train stage creates its TrainJob in when it "
        "runs outside a pod (`qlora-kfp run`); unset: `~/.kube/config`; in a pod: the pod's "
        "service account",
        owner="kubernetes client",
    ),
    Var(
        "QLORA_KFP_IMAGE",
        "the image a task runs in (set by the compiled pipeline): part of the cache fingerprint; "
        "outside a pod, the image of the nodes of a `train_runner=trainjob` TrainJob",
    ),
    Var(
        "QLORA_KFP_GIT_COMMIT",
        "the project's git commit (set in the images); unset: asked of the checkout's git",
    ),
    Var(
        "QLORA_KFP_GPUS",
        "GPUs per GPU task (the compiled pipeline passes it on to the tasks: the train task's "
        "processes when `num_processes` is 0); outside a pod, the GPUs of each node of a "
        "`train_runner=trainjob` TrainJob",
        default="1",
        type=int,
        when="compile,task",
    ),
    # Fixed when a pipeline is compiled (pipelines/platform.py, components/images.py).
    Var(
        "QLORA_KFP_SECRET",
        "Secret with credentials, as env",
        default="qlora-kfp-credentials",
        when="compile",
    ),
    Var(
        "QLORA_KFP_CONFIGMAP",
        "ConfigMap with endpoints, as env",
        default="qlora-kfp-config",
        when="compile",
    ),
    Var(
        "QLORA_KFP_CACHE_PVC",
        "PVC mounted at `/cache` for the model cache (unset: none)",
        when="compile",
    ),
    Var(
        "QLORA_KFP_SHM_SIZE",
        "size of the memory-backed `/dev/shm` of GPU tasks",
        default="16Gi",
        when="compile",
    ),
    Var(
        "QLORA_KFP_WRITING",
        "set by the project, not by users: the outputs this process's stage holds the write "
        "lock of, so the train stage's own ranks take it again (storage/writes.py)",
    ),
    Var(
        "QLORA_KFP_SCRATCH_SIZE",
        "size limit of a GPU task's scratch disk at `/scratch`, where model downloads go "
        '("": none)',
        default="200Gi",
        when="compile",
    ),
    Var(
        "QLORA_KFP_GPU_RETRIES",
        "retries of GPU tasks, e.g. after preemption",
        default="3",
        type=int,
        when="compile",
    ),
    Var(
        "QLORA_KFP_RETRY_WINDOW",
        "time from a GPU task's first attempt's start within which every attempt must end",
        default="7d",
        when="compile",
    ),
    Var(
        "QLORA_KFP_REGISTRY",
        "registry of the default images (`make compile REGISTRY=...`)",
        default="ghcr.io/qlora-kfp",
        when="compile",
    ),
    Var(
        "QLORA_KFP_TAG",
        "tag of the default images (`make compile TAG=...`)",
        default="0.1.0",
        when="compile",
    ),
    Var(
        "QLORA_KFP_CPU_IMAGE",
        "image of the CPU tasks (may carry an `@sha256:` digest)",
        default="{QLORA_KFP_REGISTRY}/qlora-kfp-cpu:{QLORA_KFP_TAG}",
        when="compile",
    ),
    Var(
        "QLORA_KFP_GPU_IMAGE",
        "image of the GPU tasks (may carry an `@sha256:` digest)",
        default="{QLORA_KFP_REGISTRY}/qlora-kfp-gpu:{QLORA_KFP_TAG}",
        when="compile",
    ),
    # The KFP API, for `make upload`, `run-remote` and `schedule` (qlora_kfp/app/kfp_api.py).
    Var(
        "KFP_HOST",
        "the KFP API (full Kubeflow: the gateway's `/pipeline`); unset: inside a pod the "
        "`ml-pipeline` Service, else the kube context through the kube API server's proxy",
        when="client",
    ),
    Var("KFP_TOKEN", "bearer token for `KFP_HOST`", when="client"),
    Var(
        "KFP_NAMESPACE",
        "multi-user Kubeflow: your profile namespace, where pipelines, runs and schedules are "
        "created (inside a pod: the pod's)",
        when="client",
    ),
    Var(
        "KFP_PROXY_NAMESPACE",
        "where KFP itself runs, for the kube-context path",
        default="kubeflow",
        when="client",
        blank_is_unset=True,
    ),
    Var(
        "KFP_SERVICE_ACCOUNT",
        "service account of the run's pods (`--service_account`; unset: the backend's default)",
        when="client",
    ),
    # Set by Kubeflow Trainer's torch plugin on each TrainJob node's container
    # (pkg/runtime/framework/plugins/torch/torch.go, names in pkg/constants/constants.go,
    # v2.0.0); qlora_kfp/stages/train_nodes.py passes them to torchrun.
    *[
        Var(name, help, type=int if name != "PET_MASTER_ADDR" else str, owner="Kubeflow Trainer")
        for name, help in (
            ("PET_NNODES", "nodes (pods) of the TrainJob"),
            ("PET_NPROC_PER_NODE", "training processes on each node"),
            ("PET_NODE_RANK", "this node's rank (its Job completion index)"),
            ("PET_MASTER_ADDR", "host name of node 0, where the rendezvous is"),
            ("PET_MASTER_PORT", "port of the rendezvous on node 0"),
        )
    ],
    # Set by the Training Operator on a PyTorchJob's pods beside the PET_* ones (v1.8.1
    # pkg/controller.v1/pytorch/master.go); train_nodes.py reads them where PET_* are missing.
    Var("MASTER_ADDR", "host name of node 0 (a PyTorchJob's Master)", owner="Training Operator"),
    Var("MASTER_PORT", "port of the rendezvous on node 0", type=int, owner="Training Operator"),
    # Set by torchrun for each training process, and for the libraries under training.
    Var("RANK", "the process's rank in the training group", "0", int, owner="torchrun"),
    Var("LOCAL_RANK", "the process's rank on its node (its GPU)", "0", int, owner="torchrun"),
    Var("WORLD_SIZE", "processes in the training group", "1", int, owner="torchrun"),
    Var(
        "OMP_NUM_THREADS",
        "CPU threads of each training process; unset: the processes the train task starts get 1",
        default="1",
        type=int,
        owner="OpenMP",
    ),
    Var(
        "PYTORCH_ALLOC_CONF",
        "CUDA allocator settings (torch 2.9+); unset: training sets `expandable_segments:True`",
        owner="PyTorch",
    ),
    Var(
        "PYTORCH_CUDA_ALLOC_CONF",
        "CUDA allocator settings, the older name; unset: as `PYTORCH_ALLOC_CONF`",
        owner="PyTorch",
    ),
]
VARS: dict[str, Var] = {v.name: v for v in _TABLE}  # tests/core/test_env.py: no name twice


def var(name: str) -> Var:
    """The table's entry for ``name``; a name that is not listed is a bug, said plainly."""
    try:
        return VARS[name]
    except KeyError:
        raise KeyError(f"{name} is not listed in qlora_kfp/env.py: add it to VARS") from None


def default(name: str, environ: Mapping[str, str] | None = None) -> str:
    """``name``'s default, with the ``{OTHER}`` variables it names filled in."""
    return re.sub(r"\{([A-Z0-9_]+)\}", lambda m: text(m.group(1), environ), var(name).default)


def text(name: str, environ: Mapping[str, str] | None = None) -> str:
    """The value of ``name`` as set, else its default ("" when it has none).

    Args:
        name: A variable of :data:`VARS`.
        environ: Where to read (default: ``os.environ``).
    """
    v = var(name)
    raw = (os.environ if environ is None else environ).get(name)
    if raw is None or (raw == "" and v.blank_is_unset):
        return default(name, environ)
    return raw


def integer(name: str, environ: Mapping[str, str] | None = None) -> int:
    """``name`` as a whole number; unset or blank: its default.

    Raises:
        ConfigError: the value is not a whole number (the message names the variable).
    """
    raw = text(name, environ).strip() or default(name, environ)
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(
            f"{name}={raw!r}: give a whole number (unset: {var(name).default or 'none'})"
        ) from None


def path(name: str, environ: Mapping[str, str] | None = None) -> Path:
    """``name`` as a path; unset: its default, whose leading ``~`` is the home folder."""
    var(name)
    raw = (os.environ if environ is None else environ).get(name)
    if raw is None or (raw == "" and var(name).blank_is_unset):
        return Path(default(name, environ)).expanduser()
    return Path(raw)


def present(name: str, environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``name`` is set at all (to anything, "" included)."""
    var(name)
    return name in (os.environ if environ is None else environ)
