"""The TrainJob a train task creates, as Kubeflow Trainer itself takes it: the Trainer's and
JobSet's own controller managers and webhooks of the releases backend/trainer/go.mod pins, on a
real API server with its garbage collector (tests/support/trainer_backend.py, fixture
``kubeflow_trainer``).

The task acts as in a run: as the qlora-kfp-runner service account (the example-trainjob
overlay applied to the namespace), reading its own pod (tests/support/kfp_task_pod.py builds it as KFP
2.17 does, from the compiled pipeline) and creating the TrainJob with
qlora_kfp.training.trainjob_client. No kubelet runs, so no pod starts: what is asserted is the
webhook's answer and the JobSet the Trainer makes, which is what each node's pod is made of.
"""

from __future__ import annotations

import dataclasses

import pytest
from support.kfp_task_pod import task_pod
from support.trainjob_cluster import profile_namespace, runner_kubeconfig

from qlora_kfp.configs import TrainConfig
from qlora_kfp.errors import TrainJobError
from qlora_kfp.stages.train_job import TrainJobRunner
from qlora_kfp.training import trainjob_client

pytestmark = pytest.mark.integration
JOB_URI = "s3://pipeline/qlora/run-1/train-job"
JOBSETS = "/apis/jobset.x-k8s.io/v1alpha2/namespaces/{}/jobsets/{}"


@pytest.fixture(scope="module")
def namespace(kubeflow_trainer, tmp_path_factory) -> str:
    work = tmp_path_factory.mktemp("overlay")
    return profile_namespace(kubeflow_trainer.kube(), "team-trainjob", work, crd=False)


@pytest.fixture(scope="module")
def task(kubeflow_trainer, namespace, tmp_path_factory):
    """The train task of a pipeline compiled with 2 GPUs a task, as the runner, with its pod
    (TrainJobRunner reads it, as in a run)."""
    kube = kubeflow_trainer.kube()
    pod = task_pod(namespace, "train")
    main = pod["spec"]["containers"][1]
    main["resources"]["limits"]["nvidia.com/gpu"] = "2"  # QLORA_KFP_GPUS=2 at compile time
    pod = kube.ok("POST", f"/api/v1/namespaces/{namespace}/pods", pod)
    config = runner_kubeconfig(kube, namespace, tmp_path_factory.mktemp("runner") / "config")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KFP_POD_NAME", pod["metadata"]["name"])
        patch.setenv("KFP_RUN_ID", "run-1")
        yield trainjob_client.connect(config), pod


def trainjob(task, job_uri: str, **settings) -> tuple[TrainJobRunner, dict, TrainConfig]:
    """The TrainJob of ``job_uri`` (its name: one per job folder) the task creates."""
    cluster, _ = task
    runner = TrainJobRunner(job_uri, cluster=cluster)  # reads the task's pod
    cfg = TrainConfig(train_runner="trainjob", **settings)
    cfg = dataclasses.replace(cfg, num_processes=runner.processes(cfg))
    return runner, runner.body(cfg, f"{job_uri}/job.json"), cfg


def test_the_trainer_makes_each_node_of_the_trainjob_like_the_train_task_s_pod(
    kubeflow_trainer, namespace, task
):
    """The webhook admits the TrainJob; its JobSet's node pods run the task's image with the
    TrainJob's command, the task's resources, env and volumes, and the PET_* values
    qlora_kfp.stages.train_nodes checks against the job (nodes, processes per node)."""
    kube = kubeflow_trainer.kube()
    _, pod = task
    runner, body, cfg = trainjob(task, JOB_URI, num_nodes=2)
    assert cfg.num_processes == 2  # one per GPU of the task's pod
    created = trainjob_client.create(runner.cluster, body)  # the Trainer's webhook admits it
    name = body["metadata"]["name"]
    job_set = kube._wait(JOBSETS.format(namespace, name), lambda obj: True)
    assert job_set["metadata"]["ownerReferences"][0]["uid"] == created["metadata"]["uid"]
    (node,) = job_set["spec"]["replicatedJobs"]
    assert node["template"]["spec"]["parallelism"] == node["template"]["spec"]["completions"] == 2
    spec = node["template"]["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    task_main = pod["spec"]["containers"][1]
    assert container["image"] == task_main["image"]
    assert container["command"] == ["python", "-m", "qlora_kfp.stages.train_nodes"] + [
        f"{JOB_URI}/job.json"
    ]
    assert container["resources"] == task_main["resources"]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    for var in body["spec"]["trainer"]["env"]:  # the task's, Secret references as they were
        assert env[var["name"]] == var.get("value", var.get("valueFrom")), var["name"]
    assert (env["PET_NNODES"], env["PET_NPROC_PER_NODE"]) == (
        str(cfg.num_nodes),
        str(cfg.num_processes),
    )
    assert env["PET_MASTER_ADDR"] == f"{name}-node-0-0.{name}"
    assert env["PET_MASTER_PORT"] == "29500"
    assert {v["name"] for v in spec["volumes"]} >= {"dshm", "scratch"}
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/dev/shm", "/scratch"}
    assert spec["tolerations"] == pod["spec"]["tolerations"]
    assert spec["serviceAccountName"] == "qlora-kfp-runner"


def test_a_retried_task_replaces_the_trainjob_its_earlier_attempt_left(
    kubeflow_trainer, namespace, task
):
    """The same job folder, the same TrainJob name: the retry deletes the earlier one (its
    JobSet first: foreground, the garbage collector) and creates its own."""
    kube = kubeflow_trainer.kube()
    runner, body, _ = trainjob(task, "s3://pipeline/qlora/run-2/train-job", num_nodes=2)
    name = body["metadata"]["name"]
    first = trainjob_client.create(runner.cluster, body)
    kube._wait(JOBSETS.format(namespace, name), lambda obj: True)
    second = trainjob_client.create(runner.cluster, body)
    assert second["metadata"]["uid"] != first["metadata"]["uid"]
    job_set = kube._wait(
        JOBSETS.format(namespace, name),
        lambda obj: obj["metadata"]["ownerReferences"][0]["uid"] == second["metadata"]["uid"],
    )
    assert job_set["metadata"]["ownerReferences"][0]["kind"] == "TrainJob"


def test_deleting_the_trainjob_deletes_its_jobset_first(kubeflow_trainer, namespace, task):
    """What the task does on SIGTERM: a foreground deletion, gone once its JobSet is."""
    kube = kubeflow_trainer.kube()
    runner, body, _ = trainjob(task, "s3://pipeline/qlora/run-3/train-job", num_nodes=2)
    name = body["metadata"]["name"]
    trainjob_client.create(runner.cluster, body)
    kube._wait(JOBSETS.format(namespace, name), lambda obj: True)
    trainjob_client.delete(runner.cluster, name)
    trainjob_client.wait_gone(runner.cluster, name, timeout_s=60)
    assert kube.request("GET", JOBSETS.format(namespace, name)).status_code == 404


def test_the_trainer_refuses_a_runtime_it_does_not_have_in_one_line(namespace, task):
    runner, body, _ = trainjob(
        task, "s3://pipeline/qlora/run-4/train-job", training_runtime="torch-nowhere"
    )
    with pytest.raises(TrainJobError) as caught:
        trainjob_client.create(runner.cluster, body)
    message = str(caught.value)
    assert "\n" not in message and "torch-nowhere" in message, message
    assert message.startswith(f"TrainJob {namespace}/{body['metadata']['name']}: 403 ")
    assert "admission webhook" in message and "manifests/components/trainjob" not in message
    assert message.endswith("; set training_runtime to a ClusterTrainingRuntime of the cluster")
    assert not caught.value.retryable
