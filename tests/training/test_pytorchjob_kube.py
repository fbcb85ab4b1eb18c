"""train_runner=pytorchjob against a real Kubernetes API server (tests/support/kube_apiserver.py) with
the PyTorchJob CRD of Training Operator v1.8.1 (manifests/base/crds, from the Go module
cache: tests/support/trainjob_cluster.py pytorchjob_crd): the PyTorchJob a train task creates passes
the CRD's schema, and the task's watch (the TrainJob's, of the PyTorchJob kind) handles how
one ends. No operator runs here: the test writes the status conditions as v1.8.1 does
(pkg/controller.v1/pytorch/pytorchjob_controller.go UpdateJobStatus: Succeeded with reason
PyTorchJobSucceeded, Failed with PyTorchJobFailed and "... is failed because N <type>
replica(s) failed."; types in pkg/apis/kubeflow.org/v1/common_types.go). The runner's Role
(pytorchjobs beside trainjobs) is checked in tests/training/test_trainjob_kube.py.
"""

from __future__ import annotations

import dataclasses
import time

import pytest
from support.kfp_task_pod import task_pod
from support.trainjob_cluster import (
    profile_namespace,
    pytorchjob_crd,
    runner_kubeconfig,
    set_condition,
    sigterm_while_watching,
)
from test_trainjob_kube import watched

from qlora_kfp.configs import TrainConfig
from qlora_kfp.errors import TrainJobError, TrainJobFailed
from qlora_kfp.stages.train_job import TrainJobRunner
from qlora_kfp.training import trainjob_client, trainjob_spec
from qlora_kfp.training.trainjob_spec import PYTORCHJOB, TaskPod

pytestmark = pytest.mark.integration
J = PYTORCHJOB


@pytest.fixture(scope="module")
def namespace(kube, tmp_path_factory) -> str:
    """A profile namespace with example-trainjob applied and the PyTorchJob CRD installed."""
    kube.apply_crds([pytorchjob_crd()])
    return profile_namespace(kube, "pytorchjob-runs", tmp_path_factory.mktemp("overlay"), False)


@pytest.fixture(scope="module")
def runner_config(kube, namespace, tmp_path_factory) -> str:
    return runner_kubeconfig(kube, namespace, tmp_path_factory.mktemp("runner") / "kubeconfig")


@pytest.fixture(scope="module")
def runner(runner_config, namespace) -> trainjob_client.Cluster:
    """The API as the train task has it, for a PyTorchJob (as TrainJobRunner makes it)."""
    return dataclasses.replace(trainjob_client.connect(runner_config), job=J)


def path(namespace: str, name: str = "") -> str:
    return f"/apis/{J.group}/{J.version}/namespaces/{namespace}/{J.plural}/{name}".rstrip("/")


def test_the_api_server_accepts_the_pytorchjob_a_train_task_creates(
    kube, runner_config, namespace, monkeypatch
):
    """Made from the train task's pod, created by the task as the runner (its Role allows
    it); stored as made, nothing pruned by the v1.8.1 schema."""
    pod = kube.ok("POST", f"/api/v1/namespaces/{namespace}/pods", task_pod(namespace, "train"))
    monkeypatch.setenv("KFP_POD_NAME", pod["metadata"]["name"])
    monkeypatch.setenv("KFP_RUN_ID", "run-1")
    cluster = trainjob_client.connect(runner_config)
    task = TrainJobRunner("s3://pipeline/qlora/run-1/train-job", cluster, kind="pytorchjob")
    assert task.what == f"PyTorchJob {namespace}/{task.name}"
    cfg = TrainConfig(train_runner="pytorchjob", num_nodes=3)
    cfg = dataclasses.replace(cfg, num_processes=task.processes(cfg))
    body = task.body(cfg, "s3://pipeline/qlora/run-1/train-job/job.json")
    assert body["kind"] == "PyTorchJob"
    assert kube.create(body, dry_run=True).ok
    trainjob_client.create(task.cluster, body)
    stored = kube.ok("GET", path(namespace, task.name))
    assert stored["metadata"]["ownerReferences"][0]["uid"] == pod["metadata"]["uid"]
    assert stored["metadata"]["labels"]["qlora-kfp/run-id"] == "run-1"
    # Nothing pruned (every field is the schema's); the CRD's default filled in.
    assert stored["spec"] == {
        **body["spec"],
        "runPolicy": {**body["spec"]["runPolicy"], "suspend": False},
    }
    replicas = stored["spec"]["pytorchReplicaSpecs"]
    assert {k: r["replicas"] for k, r in replicas.items()} == {"Master": 1, "Worker": 2}
    assert stored["spec"]["nprocPerNode"] == "1"
    (container,) = replicas["Worker"]["template"]["spec"]["containers"]
    main = pod["spec"]["containers"][1]
    assert (container["name"], container["image"]) == ("pytorch", main["image"])
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # Created again (a retried task): the earlier attempt's is replaced.
    trainjob_client.create(task.cluster, body)


@pytest.mark.parametrize(
    "break_it,refusal",
    [
        pytest.param(
            lambda s: s["pytorchReplicaSpecs"]["Master"].update(replica=1),
            'unknown field "spec.pytorchReplicaSpecs.Master.replica"',
            id="misspelt-field",
        ),
        pytest.param(
            lambda s: s["pytorchReplicaSpecs"]["Master"].update(replicas="one"),
            "spec.pytorchReplicaSpecs.Master.replicas: Invalid value",
            id="replicas-not-a-number",
        ),
    ],
)
def test_the_api_server_refuses_a_broken_pytorchjob(kube, namespace, break_it, refusal):
    """The acceptance above is the v1.8.1 schema's, not a server that takes anything."""
    body = pytorchjob_body(namespace, "qlora-train-broken")
    break_it(body["spec"])
    resp = kube.create(body, dry_run=True)
    assert not resp.ok and refusal in resp.json()["message"], resp.text[:800]


def pytorchjob_body(namespace: str, name: str) -> dict:
    task = TaskPod(namespace, image="registry.example.com/qlora-kfp-gpu:1")
    cfg = TrainConfig(train_runner="pytorchjob", num_nodes=2)
    return trainjob_spec.pytorchjob(name, task, cfg, "s3://b/job.json", {})


def condition(kind: str, reason: str, message: str):
    def act(kube, namespace, name):
        set_condition(kube, namespace, name, kind, reason, message, job=J)

    return act


def running_then(end):
    """Created and Running first (conditions the operator sets on the way), then ``end``."""

    def act(kube, namespace, name):
        for kind in ("Created", "Running"):
            condition(kind, f"PyTorchJob{kind}", f"PyTorchJob {name} is {kind.lower()}.")(
                kube, namespace, name
            )
            time.sleep(0.3)
        end(kube, namespace, name)

    return act


def deleted(kube, namespace, name):
    kube.ok("DELETE", path(namespace, name))


SUCCEEDED = condition("Succeeded", "PyTorchJobSucceeded", "PyTorchJob x is successfully completed.")
FAILED = condition(
    "Failed", "PyTorchJobFailed", "PyTorchJob x is failed because 1 Worker replica(s) failed."
)


@pytest.mark.parametrize(
    "act,outcome",
    [
        pytest.param(SUCCEEDED, "Succeeded", id="succeeded"),
        pytest.param(running_then(SUCCEEDED), "Succeeded", id="running-then-succeeded"),
        pytest.param(
            running_then(FAILED),
            "failed (PyTorchJobFailed: PyTorchJob x is failed because 1 Worker replica(s) "
            "failed.); its nodes' logs say why",
            id="failed-with-its-message",
        ),
        pytest.param(deleted, "deleted while it trained", id="deleted-by-someone"),
    ],
)
def test_the_watch_of_a_pytorchjob(kube, runner, namespace, act, outcome, request):
    name = "qlora-train-" + request.node.callspec.id
    body = pytorchjob_body(namespace, name)
    got, _ = watched(kube, runner, namespace, name, act, body=body)
    if outcome == "Succeeded":
        assert isinstance(got, dict), got
        assert "Succeeded" in [c["type"] for c in got["status"]["conditions"]]
        return
    what = f"PyTorchJob {namespace}/{name}"
    assert isinstance(got, TrainJobError), got
    assert "\n" not in str(got)
    if isinstance(got, TrainJobFailed):
        assert str(got) == f"{what} {outcome}" and got.retryable
    else:
        assert str(got).startswith(f"{what}: {outcome}") and not got.retryable


def test_sigterm_deletes_the_pytorchjob_and_fails_the_task(kube, runner_config, namespace):
    body = pytorchjob_body(namespace, "qlora-train-cancelled")
    sigterm_while_watching(kube, runner_config, body, trainjob_spec.PYTORCHJOB)
