"""train_runner=trainjob against a real Kubernetes API server (tests/support/kube_apiserver.py) with
the TrainJob CRD of the Kubeflow Trainer release backend/trainer/go.mod pins (v2.0.0): the
TrainJob a train task creates passes the CRD's schema and CEL rules, and the task's watch
handles how a TrainJob ends. What the Trainer's own webhook and controller make of it:
tests/training/test_trainjob_trainer.py.

The task acts as the qlora-kfp-runner service account of a namespace where the
example-trainjob overlay is applied, with a token the server issued: its Role is the one of
manifests/components/trainjob. No kubelet or Trainer controller runs here, so the test plays
the controller: it sets the TrainJob's status conditions as Trainer v2.0.0 does
(pkg/apis/trainer/v1alpha1/trainjob_types.go; Complete and Failed copied from its JobSet's
conditions, pkg/runtime/framework/plugins/jobset/jobset.go TerminalCondition, with JobSet
v0.8.2's reasons and messages, pkg/constants/constants.go).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import urllib3
from support.kfp_task_pod import task_pod
from support.kube_api import GRANTED, rules
from support.trainjob_cluster import (
    profile_namespace,
    runner_kubeconfig,
    set_condition,
    sigterm_while_watching,
)

from qlora_kfp.configs import TrainConfig
from qlora_kfp.errors import TrainJobError, TrainJobFailed
from qlora_kfp.stages.train_job import TrainJobRunner
from qlora_kfp.training import trainjob_client, trainjob_spec, trainjob_watch
from qlora_kfp.training.trainjob_spec import GROUP, PLURAL, VERSION, TaskPod

pytestmark = pytest.mark.integration
# manifests/components/trainjob/trainjob-rbac.yaml, as (verb, group, resource, name).
TRAINJOB_GRANTED = {
    *((verb, "trainer.kubeflow.org", "trainjobs", "") for verb in ("create", "get", "list")),
    *((verb, "trainer.kubeflow.org", "trainjobs", "") for verb in ("watch", "delete")),
    *((verb, "kubeflow.org", "pytorchjobs", "") for verb in ("create", "get", "list")),
    *((verb, "kubeflow.org", "pytorchjobs", "") for verb in ("watch", "delete")),
    ("list", "", "pods", ""),
    ("watch", "", "pods", ""),
    ("get", "", "pods/log", ""),
}


@pytest.fixture(scope="module")
def namespace(kube, tmp_path_factory) -> str:
    """A profile namespace with the TrainJob CRD installed and example-trainjob applied."""
    return profile_namespace(kube, "trainjob-runs", tmp_path_factory.mktemp("overlay"))


@pytest.fixture(scope="module")
def runner_config(kube, namespace, tmp_path_factory) -> str:
    return runner_kubeconfig(kube, namespace, tmp_path_factory.mktemp("runner") / "kubeconfig")


@pytest.fixture(scope="module")
def runner(runner_config, namespace) -> trainjob_client.Cluster:
    """The API as the train task has it (trainjob_client.connect, as the task connects)."""
    cluster = trainjob_client.connect(runner_config)
    assert cluster.namespace == namespace
    return cluster


def test_the_runner_may_make_the_calls_of_a_trainjob_and_no_more(kube, namespace):
    runner_api = kube.with_token(kube.service_account_token(namespace, "qlora-kfp-runner"))
    bare = kube.impersonating(f"system:serviceaccount:{namespace}:default")
    assert rules(runner_api, namespace) - rules(bare, namespace) == GRANTED | TRAINJOB_GRANTED


def test_the_api_server_accepts_the_trainjob_a_train_task_creates(
    kube, runner, namespace, monkeypatch
):
    """Made from the train task's pod (read by the task itself, as the runner), created by
    the task as the runner; stored as made: nothing pruned, the CRD's defaults filled in."""
    pod = kube.ok("POST", f"/api/v1/namespaces/{namespace}/pods", task_pod(namespace, "train"))
    monkeypatch.setenv("KFP_POD_NAME", pod["metadata"]["name"])
    monkeypatch.setenv("KFP_RUN_ID", "run-1")
    task = TrainJobRunner("s3://pipeline/qlora/run-1/train-job", cluster=runner)
    cfg = TrainConfig(train_runner="trainjob", num_nodes=2)
    cfg = dataclasses.replace(cfg, num_processes=task.processes(cfg))
    body = task.body(cfg, "s3://pipeline/qlora/run-1/train-job/job.json")
    assert kube.create(body, dry_run=True).ok
    trainjob_client.create(runner, body)
    stored = kube.ok("GET", kube.path(body))
    assert stored["metadata"]["ownerReferences"][0]["uid"] == pod["metadata"]["uid"]
    assert stored["metadata"]["labels"]["qlora-kfp/run-id"] == "run-1"
    assert stored["spec"]["trainer"] == body["spec"]["trainer"]
    assert stored["spec"]["podSpecOverrides"] == body["spec"]["podSpecOverrides"]
    assert stored["spec"]["managedBy"] == "trainer.kubeflow.org/trainjob-controller"
    assert stored["spec"]["suspend"] is False
    assert stored["spec"]["trainer"]["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "1"


@pytest.mark.parametrize(
    "break_it,refusal",
    [
        pytest.param(
            lambda s: s["trainer"].update(numNode=2),
            'unknown field "spec.trainer.numNode"',
            id="misspelt-field",
        ),
        pytest.param(
            lambda s: s["trainer"].update(numNodes="two"),
            "spec.trainer.numNodes: Invalid value",
            id="nodes-not-a-number",
        ),
        pytest.param(
            lambda s: s.update(managedBy="someone-else"),
            "ManagedBy must be trainer.kubeflow.org/trainjob-controller",
            id="cel-rule",
        ),
    ],
)
def test_the_api_server_refuses_a_broken_trainjob(kube, namespace, break_it, refusal):
    """The same server refuses a TrainJob the schema or a CEL rule forbids: the acceptance
    above is the schema's, not a server that takes anything."""
    body = trainjob_body(namespace, "qlora-train-broken")
    break_it(body["spec"])
    resp = kube.create(body, dry_run=True)
    assert not resp.ok and refusal in resp.json()["message"], resp.text[:800]


def trainjob_body(namespace: str, name: str) -> dict:
    task = TaskPod(namespace, image="registry.example.com/qlora-kfp-gpu:1")
    return trainjob_spec.trainjob(name, task, TrainConfig(), "s3://b/job.json", {})


class Spy:
    """The runner's CustomObjectsApi, counting the watches it starts; with ``stale``, its
    first read of the TrainJob gives resourceVersion 1, which the server has long compacted
    away (a watch from it: 410 Gone, as after a long disconnection)."""

    def __init__(self, api, stale: bool = False, broken: int = 0):
        self.api, self.stale, self.watches, self.reads = api, stale, [], 0
        real = api.list_namespaced_custom_object

        @functools.wraps(real)  # its docstring: how the client's Watch reads the events
        def list_namespaced_custom_object(*args, **kwargs):
            self.watches.append(kwargs.get("resource_version"))
            if len(self.watches) <= broken:  # the API server restarting: connection reset
                raise urllib3.exceptions.ProtocolError("Connection aborted.")
            return real(*args, **kwargs)

        self.list_namespaced_custom_object = list_namespaced_custom_object

    def get_namespaced_custom_object(self, *args, **kwargs):
        obj = self.api.get_namespaced_custom_object(*args, **kwargs)
        self.reads += 1
        if self.stale and self.reads == 1:
            obj["metadata"]["resourceVersion"] = "1"
        return obj

    def __getattr__(self, name):
        return getattr(self.api, name)


def watched(kube, runner, namespace, name, act, watch_s=30, watches=1, body=None, **spy):
    """``wait`` on a new TrainJob ``name`` (or ``body``, of ``runner``'s kind) in a thread;
    ``act`` once ``watches`` watches have started. Returns (the outcome: the object or the
    exception, the spy)."""
    assert kube.create(body or trainjob_body(namespace, name)).ok
    spy = Spy(runner.custom, **spy)
    cluster = dataclasses.replace(runner, custom=spy)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(trainjob_watch.wait, cluster, name, watch_s)
        deadline = time.monotonic() + 30
        while len(spy.watches) < watches and not future.done():
            assert time.monotonic() < deadline, "the watch never started"
            time.sleep(0.05)
        time.sleep(0.3)  # the watch request reaches the server
        act(kube, namespace, name)
        try:
            return future.result(timeout=60), spy
        except Exception as exc:  # noqa: BLE001 - the outcome under test
            return exc, spy


def complete(kube, namespace, name):
    set_condition(
        kube, namespace, name, "Complete", "AllJobsCompleted", "jobset completed successfully"
    )


def fail(kube, namespace, name):
    message = "jobset failed due to one or more job failures"
    set_condition(kube, namespace, name, "Failed", "FailedJobs", message)


def delete(kube, namespace, name):
    kube.ok("DELETE", f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}")


def suspend_then_complete(kube, namespace, name):
    set_condition(kube, namespace, name, "Suspended", "Suspended", "TrainJob is suspended")
    time.sleep(0.5)
    complete(kube, namespace, name)


def test_the_watch_returns_once_the_trainjob_is_complete(kube, runner, namespace):
    got, _ = watched(kube, runner, namespace, "qlora-train-complete", complete)
    assert isinstance(got, dict), got
    assert [c["type"] for c in got["status"]["conditions"]] == ["Complete"]


def test_a_suspended_trainjob_is_waited_for(kube, runner, namespace):
    """Suspended (Kueue queues a TrainJob so) is not an end: the watch goes on to Complete."""
    got, _ = watched(kube, runner, namespace, "qlora-train-queued", suspend_then_complete)
    assert isinstance(got, dict), got


def test_a_failed_trainjob_is_one_line_naming_its_reason(kube, runner, namespace):
    got, _ = watched(kube, runner, namespace, "qlora-train-failed", fail)
    assert isinstance(got, TrainJobFailed) and got.retryable
    assert str(got) == (
        f"TrainJob {namespace}/qlora-train-failed failed (FailedJobs: jobset failed due to one "
        "or more job failures); its nodes' logs say why"
    )


def test_a_trainjob_deleted_mid_watch_is_an_error_naming_it(kube, runner, namespace):
    got, _ = watched(kube, runner, namespace, "qlora-train-deleted", delete)
    assert isinstance(got, TrainJobError) and not isinstance(got, TrainJobFailed), got
    assert str(got).startswith(f"TrainJob {namespace}/qlora-train-deleted: deleted while it ")
    assert not got.retryable


def test_a_410_gone_reads_the_trainjob_again_and_watches_on(kube, runner, namespace, caplog):
    with caplog.at_level(logging.INFO, logger="qlora_kfp.training.trainjob_watch"):
        got, spy = watched(
            kube, runner, namespace, "qlora-train-gone", complete, stale=True, watches=2
        )
    assert isinstance(got, dict), got
    assert spy.watches[0] == "1" and spy.reads == 2  # the stale watch, then a fresh read
    assert "expired (410 Gone): reading it again" in caplog.text


def test_each_watch_times_out_and_the_next_goes_on_from_where_it_was(kube, runner, namespace):
    got, spy = watched(kube, runner, namespace, "qlora-train-slow", complete, watch_s=1, watches=3)
    assert isinstance(got, dict), got
    assert spy.reads == 1  # no read again: each watch went on from the last version seen


def test_an_api_that_does_not_answer_for_a_while_is_asked_again(
    kube, runner, namespace, monkeypatch
):
    monkeypatch.setattr(trainjob_watch, "API_RETRY_S", 0.1)
    got, spy = watched(kube, runner, namespace, "qlora-train-reset", complete, watches=3, broken=2)
    assert isinstance(got, dict), got
    assert spy.reads == 3  # read again after each broken watch


def test_sigterm_deletes_the_trainjob_and_fails_the_task(kube, runner_config, namespace):
    """KFP terminating a run stops its pods (SIGTERM): the task deletes its TrainJob, with
    its JobSet and pods before it (foreground), and exits non-zero."""
    body = trainjob_body(namespace, "qlora-train-cancelled")
    sigterm_while_watching(kube, runner_config, body, trainjob_spec.TRAINJOB)
