"""The TrainJob a train task creates (``train_runner=trainjob``), made like the task's own pod.

Kubeflow Trainer v2.0.0, ``trainer.kubeflow.org/v1alpha1`` (pkg/apis/trainer/v1alpha1/
trainjob_types.go): ``spec.runtimeRef`` names a ClusterTrainingRuntime (the upstream
``torch-distributed``, manifests/base/runtimes/torch_distributed.yaml), whose ``node`` job
runs ``num_nodes`` pods of the ``node`` container; ``spec.trainer`` sets that container's
image, command, environment and resources; ``spec.podSpecOverrides`` the pods' placement and
volumes (pkg/runtime/core/trainingruntime.go, mergePodSpecOverrides).

Each node is what the train task's pod is: the same image, resources (its GPUs, cpu and
memory), environment (the credentials and endpoints the pipeline gave it, by the same Secret
and ConfigMap references), node selector, tolerations, service account (a workload identity
for S3 comes with it) and scratch volumes. The task reads its own pod for that
(``KFP_POD_NAME``); the TrainJob is owned by that pod, so deleting the run's pods (KFP deletes
a run's workflow, Argo its pods) deletes the TrainJob and its pods with them.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from qlora_kfp import env
from qlora_kfp.configs import TrainConfig
from qlora_kfp.errors import ConfigError

GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
# The runtime's trainer job and its container (pkg/constants/constants.go: Node = "node").
NODE = "node"
# The container KFP runs a component in (backend/src/v2/compiler/argocompiler/container.go).
MAIN_CONTAINER = "main"
# The Trainer's torch plugin sets these itself and its webhook refuses a TrainJob that does
# (pkg/constants/constants.go TorchRunReservedEnvNames); KFP_POD_* name the task's own pod.
# The Training Operator sets them on a PyTorchJob's pods (pkg/controller.v1/pytorch/envvar.go,
# master.go), after the template's own.
DROPPED_ENV = frozenset(
    {"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"}
    | {"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK"}
    | {"KFP_POD_NAME", "KFP_POD_UID"}
)
# The task's pod's own: KFP's launcher binary (argocompiler/container.go) and Argo's
# executor files (argo-workflows workflow/common/common.go, var-run-argo).
KFP_VOLUMES = frozenset({"kfp-launcher", "var-run-argo"})
LABEL_PREFIX = "qlora-kfp"
ENTRYPOINT = ["python", "-m", "qlora_kfp.stages.train_nodes"]


@dataclass(frozen=True)
class JobKind:
    """The kind of object the train task creates, for its client, watch and log relay.

    Attributes:
        done, failed: The status condition types that end it (``status: "True"``).
        container: The nodes' container; ``node0_selector`` (a ``str.format`` of the
            object's name) selects node 0's pods.
    """

    group: str
    version: str
    plural: str
    kind: str
    done: str
    failed: str
    container: str
    node0_selector: str


# Node 0's pod of a TrainJob: JobSet names each pod's JobSet (sigs.k8s.io/jobset
# api/jobset/v1alpha2/jobset_types.go JobSetNameKey); the Job controller labels a pod of an
# Indexed Job with its index (kubernetes pkg/apis/batch/types.go JobCompletionIndexAnnotation,
# a label too since 1.28); the Trainer's node job is one Indexed Job of num_nodes pods.
TRAINJOB = JobKind(
    GROUP,
    VERSION,
    PLURAL,
    KIND,
    done="Complete",
    failed="Failed",
    container=NODE,
    node0_selector="jobset.sigs.k8s.io/jobset-name={},batch.kubernetes.io/job-completion-index=0",
)
# Training Operator v1.8.1 (github.com/kubeflow/training-operator, pkg/apis/kubeflow.org/v1):
# conditions Created, Running, Restarting, Succeeded, Suspended, Failed (common_types.go); the
# container must be "pytorch" and its port "pytorchjob-port" (pytorch_types.go); node 0 is the
# Master replica, its pods labelled with the job, replica type and index (common_types.go
# JobNameLabel, ReplicaTypeLabel, ReplicaIndexLabel).
PYTORCHJOB = JobKind(
    "kubeflow.org",
    "v1",
    "pytorchjobs",
    "PyTorchJob",
    done="Succeeded",
    failed="Failed",
    container="pytorch",
    node0_selector="training.kubeflow.org/job-name={},training.kubeflow.org/replica-type=master,"
    "training.kubeflow.org/replica-index=0",
)
PYTORCHJOB_PORT = {"name": "pytorchjob-port", "containerPort": 23456, "protocol": "TCP"}


@dataclass(frozen=True)
class TaskPod:
    """What a node takes from the train task's pod (Kubernetes API field names and shapes).

    Attributes:
        namespace: Where the TrainJob goes.
        name, uid: The task's pod, the TrainJob's owner ("" outside a pod: no owner).
    """

    namespace: str
    name: str = ""
    uid: str = ""
    image: str = ""
    resources: dict = field(default_factory=dict)
    env: list = field(default_factory=list)
    node_selector: dict = field(default_factory=dict)
    tolerations: list = field(default_factory=list)
    volumes: list = field(default_factory=list)
    volume_mounts: list = field(default_factory=list)
    service_account: str = ""

    @classmethod
    def from_pod(cls, pod: dict) -> TaskPod:
        """From the task's Pod as the API returns it (camelCase JSON)."""
        spec = pod["spec"]
        main = next(c for c in spec["containers"] if c["name"] == MAIN_CONTAINER)
        mounts = [m for m in main.get("volumeMounts") or [] if m["name"] not in KFP_VOLUMES]
        named = {m["name"] for m in mounts}
        # Scratch and cache volumes only: the service-account token and KFP's own volumes
        # are the pod's, and every node gets its own token from the kubelet.
        volumes = [
            v
            for v in spec.get("volumes") or []
            if v["name"] in named and ("emptyDir" in v or "persistentVolumeClaim" in v)
        ]
        kept = {v["name"] for v in volumes}
        return cls(
            namespace=pod["metadata"]["namespace"],
            name=pod["metadata"]["name"],
            uid=pod["metadata"]["uid"],
            image=main["image"],
            resources=main.get("resources") or {},
            env=node_env(main.get("env") or []),
            node_selector=spec.get("nodeSelector") or {},
            tolerations=spec.get("tolerations") or [],
            volumes=volumes,
            volume_mounts=[m for m in mounts if m["name"] in kept],
            service_account=spec.get("serviceAccountName", ""),
        )

    @classmethod
    def outside(cls, namespace: str) -> TaskPod:
        """For a train stage outside a pod (``qlora-kfp run`` with a kubeconfig): the image
        ``QLORA_KFP_IMAGE``, ``QLORA_KFP_GPUS`` NVIDIA GPUs per node, no owner."""
        image = env.text("QLORA_KFP_IMAGE")
        if not image:
            raise ConfigError(
                "train_runner=trainjob outside a KFP pod: set QLORA_KFP_IMAGE to the image "
                "the TrainJob's nodes run (the GPU image, e.g. ghcr.io/qlora-kfp/qlora-kfp-gpu)"
            )
        gpus = env.integer("QLORA_KFP_GPUS")
        limits = {"nvidia.com/gpu": str(gpus)} if gpus else {}
        # Requested as limited, as a pod's defaulting does: the Trainer's torch plugin reads
        # the requests after the limits, and without any gives a node one process whatever
        # numProcPerNode says (pkg/runtime/framework/plugins/torch/torch.go,
        # calculateNumProcPerNode).
        return cls(
            namespace=namespace, image=image, resources={"limits": limits, "requests": limits}
        )


def node_env(task_env: list[dict]) -> list[dict]:
    """The task container's ``env`` for a node: values and Secret/ConfigMap references as
    they are; references to the pod's own fields would name the node's pod instead, so they
    are dropped, except the KFP run id, which is passed on as its value."""
    out = []
    for var in task_env:
        # ARGO_*: Argo's executor's, about this pod's template and node of the workflow.
        if var["name"] in DROPPED_ENV or var["name"].startswith("ARGO_"):
            continue
        source = var.get("valueFrom") or {}
        if "fieldRef" in source or "resourceFieldRef" in source:
            if var["name"] == "KFP_RUN_ID" and env.text("KFP_RUN_ID"):
                out.append({"name": "KFP_RUN_ID", "value": env.text("KFP_RUN_ID")})
            continue
        out.append(var)
    return out


def accelerators(resources: dict) -> int:
    """Accelerators in a container's limits: every resource named with a domain
    (``nvidia.com/gpu``, ``amd.com/gpu``, ``nvidia.com/mig-3g.40gb``) but Kubernetes' own."""
    limits = resources.get("limits") or {}
    return sum(
        int(v)
        for k, v in limits.items()
        if "/" in k and not k.split("/")[0].endswith("kubernetes.io")
    )


def processes_per_node(cfg: TrainConfig, pod: TaskPod) -> int:
    """``num_processes``, or one per accelerator of the task's pod (1 with none)."""
    return cfg.num_processes or max(accelerators(pod.resources), 1)


def job_name(key: str) -> str:
    """The TrainJob of ``key`` (the job's S3 folder: one per run and sweep trial): the same
    name on a retried task, which replaces a TrainJob its earlier attempt left. An RFC 1035
    label, as the Trainer's webhook requires (pkg/webhooks/trainjob_webhook.go), short enough
    for the names of the Jobs and pods made from it (``<name>-node-0-<index>``)."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    return f"qlora-train-{digest}"


def labels(run_id: str) -> dict[str, str]:
    """What ties the TrainJob to its KFP run (a label value: at most 63 name characters)."""
    out = {"app.kubernetes.io/part-of": "qlora-kfp", "app.kubernetes.io/component": "train"}
    value = re.sub(r"[^A-Za-z0-9_.-]", "-", run_id)[:63].strip("-_.")
    out[f"{LABEL_PREFIX}/run-id"] = value or "local"
    return out


def trainjob(
    name: str, pod: TaskPod, cfg: TrainConfig, job_uri: str, run_labels: dict[str, str]
) -> dict:
    """The TrainJob: ``cfg.num_nodes`` nodes, each running :mod:`qlora_kfp.stages.train_nodes`
    on ``job_uri`` (the job's ``job.json``) with :func:`processes_per_node` processes."""
    meta: dict = {"name": name, "namespace": pod.namespace, "labels": run_labels}
    if pod.uid:
        # Not blockOwnerDeletion: setting it needs delete rights on the pod (admission plugin
        # OwnerReferencesPermissionEnforcement), and nothing waits on the pod's deletion.
        meta["ownerReferences"] = [
            {"apiVersion": "v1", "kind": "Pod", "name": pod.name, "uid": pod.uid}
        ]
    trainer = {
        "image": pod.image,
        "command": [*ENTRYPOINT, job_uri],
        "numNodes": cfg.num_nodes,
        "numProcPerNode": processes_per_node(cfg, pod),
        "env": pod.env,
    }
    if pod.resources:
        trainer["resourcesPerNode"] = pod.resources
    override: dict = {"targetJobs": [{"name": NODE}]}
    override.update(_placement(pod))
    if pod.volume_mounts:
        override["containers"] = [{"name": NODE, "volumeMounts": pod.volume_mounts}]
    spec: dict = {
        "runtimeRef": {
            "apiGroup": GROUP,
            "kind": "ClusterTrainingRuntime",
            "name": cfg.training_runtime,
        },
        "trainer": trainer,
    }
    if len(override) > 1:
        spec["podSpecOverrides"] = [override]
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": meta, "spec": spec}


def _placement(pod: TaskPod) -> dict:
    """Where and as whom the task's pod runs, and its volumes: what every node's pod keeps."""
    placement = {
        "nodeSelector": pod.node_selector,
        "tolerations": pod.tolerations,
        "volumes": pod.volumes,
        "serviceAccountName": pod.service_account,
    }
    return {key: value for key, value in placement.items() if value}


def pytorchjob(
    name: str, pod: TaskPod, cfg: TrainConfig, job_uri: str, run_labels: dict[str, str]
) -> dict:
    """The Training Operator v1 PyTorchJob (``train_runner=pytorchjob``) of the same nodes as
    :func:`trainjob`: a ``Master`` (node 0) and ``num_nodes - 1`` ``Worker`` replicas, each
    pod made like the task's; the operator gives each the ``PET_*`` variables of torchrun
    from ``nprocPerNode`` and the replicas (pkg/controller.v1/pytorch/envvar.go)."""
    body = trainjob(name, pod, cfg, job_uri, run_labels)
    container: dict = {
        "name": PYTORCHJOB.container,
        "image": pod.image,
        "command": [*ENTRYPOINT, job_uri],
        "env": pod.env,
        "ports": [PYTORCHJOB_PORT],
    }
    if pod.resources:
        container["resources"] = pod.resources
    if pod.volume_mounts:
        container["volumeMounts"] = pod.volume_mounts
    pod_spec: dict = {"containers": [container], **_placement(pod)}

    def replicas(n: int) -> dict:
        # OnFailure would restart a node alone, which a static rendezvous cannot take in:
        # the job fails, and the task's retry resumes from the checkpoints.
        return {
            "replicas": n,
            "restartPolicy": "Never",
            "template": {"metadata": {"labels": run_labels}, "spec": pod_spec},
        }

    specs = {"Master": replicas(1)}
    if cfg.num_nodes > 1:
        specs["Worker"] = replicas(cfg.num_nodes - 1)
    return {
        "apiVersion": f"{PYTORCHJOB.group}/{PYTORCHJOB.version}",
        "kind": PYTORCHJOB.kind,
        "metadata": body["metadata"],
        "spec": {
            "runPolicy": {"cleanPodPolicy": "Running"},
            "nprocPerNode": str(processes_per_node(cfg, pod)),
            "pytorchReplicaSpecs": specs,
        },
    }
