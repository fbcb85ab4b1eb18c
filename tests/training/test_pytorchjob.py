"""train_runner=pytorchjob without a cluster: the Training Operator v1 PyTorchJob a train
task's pod makes (tests/support/kfp_task_pod.py builds the pod as KFP 2.17 does), the settings that
allow it, and the node side reading the operator's variables (v1.8.1
pkg/controller.v1/pytorch/envvar.go, master.go). The API server's answers and the watch:
tests/training/test_pytorchjob_kube.py."""

from __future__ import annotations

import dataclasses

import pytest

from qlora_kfp.configs import TrainConfig
from qlora_kfp.errors import ConfigError
from qlora_kfp.stages import train_nodes
from qlora_kfp.training import trainjob_client, trainjob_logs, trainjob_spec
from qlora_kfp.training.trainjob_spec import TaskPod

JOB_JSON = "s3://b/r/train-job/job.json"


def test_a_pytorchjob_is_a_master_and_workers_each_like_the_train_task_s_pod(pod):
    cfg = TrainConfig(train_runner="pytorchjob", num_nodes=3)
    task = TaskPod.from_pod(pod)
    main = pod["spec"]["containers"][1]
    job = trainjob_spec.pytorchjob("qlora-train-x", task, cfg, JOB_JSON, {"a": "b"})
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    spec = job["spec"]
    assert spec["nprocPerNode"] == "1"  # a string in the v1 API (intstr "auto" or a count)
    assert spec["runPolicy"] == {"cleanPodPolicy": "Running"}
    replicas = spec["pytorchReplicaSpecs"]
    assert {k: r["replicas"] for k, r in replicas.items()} == {"Master": 1, "Worker": 2}
    assert replicas["Master"]["template"] == replicas["Worker"]["template"]
    template = replicas["Master"]["template"]
    assert template["metadata"]["labels"] == {"a": "b"}
    (container,) = template["spec"]["containers"]
    assert container["name"] == "pytorch"  # the operator's (PyTorchJobDefaultContainerName)
    assert container["ports"] == [
        {"name": "pytorchjob-port", "containerPort": 23456, "protocol": "TCP"}
    ]
    assert container["image"] == main["image"]
    assert container["command"] == [*trainjob_spec.ENTRYPOINT, JOB_JSON]
    assert container["resources"] == main["resources"]
    env = {e["name"]: e for e in container["env"]}
    secret = env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]
    assert secret["name"] == "qlora-kfp-credentials"
    assert env["KFP_RUN_ID"] == {"name": "KFP_RUN_ID", "value": "run-1"}
    assert not {"KFP_POD_NAME", "KFP_POD_UID", "ARGO_CONTAINER_NAME"} & set(env)
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/dev/shm", "/scratch"}
    assert template["spec"]["tolerations"] == pod["spec"]["tolerations"]
    assert template["spec"]["serviceAccountName"] == "qlora-kfp-runner"
    assert {v["name"] for v in template["spec"]["volumes"]} == {"dshm", "scratch"}
    assert job["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Pod", "name": "run-1-train", "uid": pod["metadata"]["uid"]}
    ]
    # The same object as the TrainJob's metadata: one name per job folder, the run's labels.
    trainjob = trainjob_spec.trainjob("qlora-train-x", task, cfg, JOB_JSON, {"a": "b"})
    assert job["metadata"] == trainjob["metadata"]


def test_one_node_is_a_master_alone():
    task = TaskPod("team-a", image="img", resources={"limits": {"nvidia.com/gpu": "4"}})
    job = trainjob_spec.pytorchjob(
        "j", task, TrainConfig(train_runner="pytorchjob"), "s3://b/j", {}
    )
    assert list(job["spec"]["pytorchReplicaSpecs"]) == ["Master"]
    assert job["spec"]["nprocPerNode"] == "4"


@pytest.mark.parametrize(
    "store,refused",
    [
        pytest.param("", True, id="without-a-store"),
        pytest.param("s3://bucket/qlora", False, id="with-an-s3-store"),
    ],
)
def test_a_pytorchjob_needs_an_s3_artifact_store(store, refused):
    cfg = TrainConfig(train_runner="pytorchjob", num_nodes=2)  # several nodes allowed
    if not refused:
        cfg.check_runner(store)
        return
    with pytest.raises(ConfigError, match=r"^train_runner='pytorchjob' is invalid: a pytorchjob"):
        cfg.check_runner(store)


# What Training Operator v1.8.1 gives a Worker (index 0, so node 1) of a 2-replica job with
# nprocPerNode "4" (setPodEnv: PYTHONUNBUFFERED, the master's variables, WORLD_SIZE, RANK,
# PET_NODE_RANK, PET_NPROC_PER_NODE, PET_NNODES).
OPERATOR_ENV = {
    "PYTHONUNBUFFERED": "1",
    "MASTER_PORT": "23456",
    "PET_MASTER_PORT": "23456",
    "MASTER_ADDR": "qlora-train-x-master-0",
    "PET_MASTER_ADDR": "qlora-train-x-master-0",
    "WORLD_SIZE": "8",
    "RANK": "1",
    "PET_NODE_RANK": "1",
    "PET_NPROC_PER_NODE": "4",
    "PET_NNODES": "2",
}
PET = {
    "NNODES": "2",
    "NPROC_PER_NODE": "4",
    "NODE_RANK": "1",
    "MASTER_ADDR": "qlora-train-x-master-0",
    "MASTER_PORT": "23456",
}
OLDER = {k: v for k, v in OPERATOR_ENV.items() if k not in {"PET_MASTER_ADDR", "PET_MASTER_PORT"}}


@pytest.mark.parametrize(
    "given,expected",
    [
        pytest.param(OPERATOR_ENV, PET, id="training-operator-v1.8.1"),
        pytest.param(
            {k: v for k, v in OLDER.items() if k != "PET_NODE_RANK"}, PET, id="master-and-rank"
        ),
        pytest.param({**OPERATOR_ENV, "MASTER_ADDR": "other", "RANK": "5"}, PET, id="pet-first"),
    ],
)
def test_a_node_reads_the_training_operator_s_variables(monkeypatch, given, expected):
    for name in {*OPERATOR_ENV, *(f"PET_{k}" for k in PET)}:
        monkeypatch.delenv(name, raising=False)
    for name, value in given.items():
        monkeypatch.setenv(name, value)
    assert train_nodes.node_env() == expected


def test_a_worker_meets_the_master_at_the_operator_s_address(monkeypatch, tmp_path):
    """train_node hands torchrun the operator's values as its static rendezvous."""
    for name in {*OPERATOR_ENV, *(f"PET_{k}" for k in PET)}:
        monkeypatch.delenv(name, raising=False)
    for name, value in OLDER.items():  # no PET_MASTER_*: MASTER_ADDR and MASTER_PORT serve
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("QLORA_KFP_CACHE", str(tmp_path))
    monkeypatch.setattr(train_nodes.sources, "localize", lambda uri: str(tmp_path / "in"))
    launched = {}

    def launch(module, job, procs, on_row, rendezvous, expect_result):
        launched.update(procs=procs, rendezvous=rendezvous, main=expect_result)
        return {}

    monkeypatch.setattr(train_nodes.distributed, "launch", launch)
    cfg = TrainConfig(train_runner="pytorchjob", num_nodes=2, num_processes=4, checkpoint_steps=0)
    job = {"config": dataclasses.asdict(cfg), "made_from": {}, "checkpoint_uri": ""}
    train_nodes.train_node(JOB_JSON, {**job, "model_uri": "s3://b/m", "dataset_uri": "s3://b/d"})
    assert launched == {
        "procs": 4,
        "rendezvous": [
            "--nnodes=2",
            "--node_rank=1",
            "--master_addr=qlora-train-x-master-0",
            "--master_port=23456",
        ],
        "main": False,  # a Worker: node 1 uploads nothing
    }


class FakeCore:
    """CoreV1Api's pod calls, as the log relay makes them."""

    def __init__(self, stop):
        self.stop, self.selectors, self.containers = stop, [], []

    def list_namespaced_pod(self, namespace, label_selector):
        from types import SimpleNamespace as O

        self.selectors.append(label_selector)
        status = O(name="pytorch", state=O(running=True, terminated=None))
        meta = O(name="j-master-0", uid="u1", creation_timestamp=1)
        return O(items=[O(metadata=meta, status=O(container_statuses=[status]))])

    def read_namespaced_pod_log(self, name, namespace, container, **kwargs):
        self.containers.append(container)
        self.stop.set()
        return iter([b'qlora-kfp-row: {"step": 1}\n'])


def test_the_master_s_log_is_relayed(monkeypatch):
    """Node 0 of a PyTorchJob is its Master's pod (the operator's labels), its container
    ``pytorch``."""
    import threading

    stop = threading.Event()
    core = FakeCore(stop)
    cluster = trainjob_client.Cluster(None, core, "team-a", job=trainjob_spec.PYTORCHJOB)
    rows = []
    trainjob_logs.follow_logs(cluster, "j", rows.append, stop, poll_s=0)
    assert core.selectors == [
        "training.kubeflow.org/job-name=j,training.kubeflow.org/replica-type=master,"
        "training.kubeflow.org/replica-index=0"
    ]
    assert core.containers == ["pytorch"]
    assert rows == [{"step": 1}]


@pytest.mark.parametrize(
    "what,hint",
    [
        pytest.param(
            "PyTorchJob team-a/j",
            "is the Training Operator v1 installed (its PyTorchJob CRD) in this cluster?",
            id="pytorchjob",
        ),
        pytest.param(
            "TrainJob team-a/j",
            "is Kubeflow Trainer v2 installed (its TrainJob CRD) in this cluster?",
            id="trainjob",
        ),
    ],
)
def test_a_missing_crd_names_what_to_install(what, hint):
    from kubernetes.client.exceptions import ApiException

    from qlora_kfp.errors import TrainJobError

    exc = ApiException(status=404, reason="Not Found")
    exc.body = '{"message": "the server could not find the requested resource"}'
    with pytest.raises(TrainJobError) as caught, trainjob_client.explained(what):
        raise exc
    assert str(caught.value) == (
        f"{what}: 404 the server could not find the requested resource; {hint}"
    )
