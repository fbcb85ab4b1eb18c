"""train_runner=trainjob without a cluster: the settings' checks, the TrainJob a train task's
pod makes (tests/support/kfp_task_pod.py builds the pod as KFP 2.17 does), and node 0's log relay.
The API server's and the Trainer's answers are in tests/training/test_trainjob_kube.py."""

from __future__ import annotations

import pytest

from qlora_kfp.configs import TrainConfig
from qlora_kfp.errors import ConfigError
from qlora_kfp.training import trainjob_logs, trainjob_spec
from qlora_kfp.training.trainjob_spec import TaskPod

STORE_CASES = [
    pytest.param("trainjob", "", "refused", id="trainjob-without-a-store"),
    pytest.param("trainjob", "file:///srv/qlora", "refused", id="trainjob-with-a-local-store"),
    pytest.param("trainjob", "s3://bucket/qlora", "", id="trainjob-with-an-s3-store"),
    pytest.param("pod", "", "", id="pod-needs-no-store"),
]


@pytest.mark.parametrize("runner,store,refused", STORE_CASES)
def test_a_trainjob_needs_an_s3_artifact_store(runner, store, refused):
    cfg = TrainConfig(train_runner=runner)
    if not refused:
        cfg.check_runner(store)
        return
    with pytest.raises(ConfigError) as caught:
        cfg.check_runner(store)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("train_runner='trainjob' is invalid: ")
    assert "set QLORA_KFP_ARTIFACT_URI (e.g. s3://bucket/qlora)" in message


def test_the_train_stage_refuses_a_trainjob_without_a_store_before_any_work(tmp_path):
    from qlora_kfp.stages.train import run_train

    out = tmp_path / "adapter"
    with pytest.raises(ConfigError, match="set QLORA_KFP_ARTIFACT_URI"):
        run_train(TrainConfig(train_runner="trainjob"), "model", "dataset", str(out), job_uri="")
    assert list(tmp_path.iterdir()) == []  # not even its output's lock


def test_preflight_refuses_a_trainjob_without_a_store(demo_assets, monkeypatch):
    from test_memory import preflight_args

    from qlora_kfp.tasks.bookkeeping_tasks import preflight

    monkeypatch.delenv("QLORA_KFP_ARTIFACT_URI", raising=False)
    args = preflight_args(demo_assets["base_model"], train_runner="trainjob", num_nodes=2)
    with pytest.raises(SystemExit, match=r"^preflight failed: train_runner='trainjob' is inv"):
        preflight(args)


def test_several_nodes_need_a_trainjob():
    with pytest.raises(ConfigError) as caught:
        TrainConfig(num_nodes=2)
    assert str(caught.value) == (
        "num_nodes=2 is invalid: several nodes train only as a TrainJob or PyTorchJob: set "
        "train_runner=trainjob (or pytorchjob), or num_nodes=1"
    )


def test_each_node_is_made_like_the_train_task_s_pod(pod):
    cfg = TrainConfig(train_runner="trainjob", num_nodes=3)
    task = TaskPod.from_pod(pod)
    main = pod["spec"]["containers"][1]
    job = trainjob_spec.trainjob("qlora-train-x", task, cfg, "s3://b/r/train-job/job.json", {})
    trainer = job["spec"]["trainer"]
    assert trainer["image"] == main["image"]
    assert trainer["command"] == [*trainjob_spec.ENTRYPOINT, "s3://b/r/train-job/job.json"]
    assert trainer["numNodes"] == 3
    # The GPUs, cpu and memory the compiled pipeline gives the train task, per node.
    assert trainer["resourcesPerNode"] == main["resources"]
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "1"
    assert trainer["numProcPerNode"] == 1
    env = {e["name"]: e for e in trainer["env"]}
    secret = env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]
    assert secret["name"] == "qlora-kfp-credentials"  # a reference, never the value
    assert env["QLORA_KFP_ARTIFACT_URI"]["valueFrom"]["configMapKeyRef"]["name"] == (
        "qlora-kfp-config"
    )
    assert env["QLORA_KFP_CACHE"] == {"name": "QLORA_KFP_CACHE", "value": "/scratch/qlora-kfp"}
    assert env["KFP_RUN_ID"] == {"name": "KFP_RUN_ID", "value": "run-1"}  # the task's, resolved
    assert not {"KFP_POD_NAME", "KFP_POD_UID", "ARGO_CONTAINER_NAME"} & set(env)
    (override,) = job["spec"]["podSpecOverrides"]
    assert override["targetJobs"] == [{"name": "node"}]
    assert override["tolerations"] == pod["spec"]["tolerations"]
    assert override["serviceAccountName"] == "qlora-kfp-runner"
    assert {v["name"] for v in override["volumes"]} == {"dshm", "scratch"}
    (container,) = override["containers"]
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/dev/shm", "/scratch"}
    assert job["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Pod", "name": "run-1-train", "uid": pod["metadata"]["uid"]}
    ]
    assert job["spec"]["runtimeRef"]["name"] == "torch-distributed"


@pytest.mark.parametrize(
    "num_processes,limits,per_node",
    [
        pytest.param(0, {"nvidia.com/gpu": "4", "memory": "64Gi"}, 4, id="one-per-gpu"),
        pytest.param(2, {"nvidia.com/gpu": "4"}, 2, id="as-set"),
        pytest.param(0, {"nvidia.com/mig-3g.40gb": "1"}, 1, id="a-mig-slice"),
        pytest.param(0, {"amd.com/gpu": "8"}, 8, id="amd"),
        pytest.param(0, {"memory": "64Gi", "hugepages-2Mi": "1Gi"}, 1, id="no-gpu"),
    ],
)
def test_processes_per_node(num_processes, limits, per_node):
    task = TaskPod("ns", resources={"limits": limits})
    assert trainjob_spec.processes_per_node(TrainConfig(num_processes=num_processes), task) == (
        per_node
    )


def test_outside_a_pod_the_image_must_be_named(monkeypatch):
    monkeypatch.delenv("QLORA_KFP_IMAGE", raising=False)
    with pytest.raises(ConfigError, match="set QLORA_KFP_IMAGE to the image"):
        TaskPod.outside("default")
    monkeypatch.setenv("QLORA_KFP_IMAGE", "registry.example.com/qlora-kfp-gpu:1")
    monkeypatch.setenv("QLORA_KFP_GPUS", "2")
    task = TaskPod.outside("default")
    gpus = {"nvidia.com/gpu": "2"}
    assert task.resources == {"limits": gpus, "requests": gpus} and not task.uid


def test_outside_a_pod_without_a_kubeconfig_is_one_line(monkeypatch, tmp_path):
    from qlora_kfp.training import trainjob_client

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    with pytest.raises(ConfigError) as caught:
        trainjob_client.connect()
    message = str(caught.value)
    assert "\n" not in message and message.startswith(
        "train_runner=trainjob needs a Kubernetes cluster: not in a pod, and the kubeconfig "
        f"({tmp_path / 'none'}) gives none"
    )


def test_a_trainjob_name_is_an_rfc_1035_label_one_per_job_folder():
    import re

    a = trainjob_spec.job_name("s3://b/qlora/run-1/train-job")
    assert a == trainjob_spec.job_name("s3://b/qlora/run-1/train-job")  # a retry: the same
    assert a != trainjob_spec.job_name("s3://b/qlora/run-1/trial-0a1b2c3d/train-job")
    # Its Jobs' pods are <name>-node-0-<index>: room for them within 63 characters.
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", a) and len(a) <= 63 - len("-node-0-99")


ROW = '{"step": 2, "loss": 1.5}'
RELAY_CASES = [
    pytest.param(["loading", f"{trainjob_logs.ROW_MARK}{ROW}"], [2], ["loading"], id="a-row"),
    pytest.param([f"[rank0]: {trainjob_logs.ROW_MARK}{ROW}"], [2], [], id="a-prefixed-row"),
    pytest.param(
        [f"{trainjob_logs.ROW_MARK}" + '{"step": 3, "lo'],
        [],
        [f'{trainjob_logs.ROW_MARK}{{"step": 3, "lo'],
        id="a-cut-off-row",
    ),
    pytest.param(["step 4/8 loss 1.2"], [], ["step 4/8 loss 1.2"], id="a-progress-line"),
]


@pytest.mark.parametrize("lines,steps,echoed", RELAY_CASES)
def test_node_0_s_rows_are_relayed_and_its_other_lines_echoed(lines, steps, echoed):
    rows, shown = [], []
    trainjob_logs.relay(lines, rows.append, shown.append)
    assert [r["step"] for r in rows] == steps and shown == echoed


def test_a_row_split_across_chunks_of_the_log_stream_is_one_row():
    chunks = ["a\n" + trainjob_logs.ROW_MARK + '{"st', 'ep": 1}\nb']
    rows, shown = [], []
    trainjob_logs.relay(trainjob_logs._split(chunks), rows.append, shown.append)
    assert rows == [{"step": 1}] and shown == ["a", "b"]
