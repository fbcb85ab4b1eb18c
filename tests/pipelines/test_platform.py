"""The compiled IR carries the Kubernetes settings: GPU pools, secrets, shm, retries, caching."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TOL = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
GPU_TASKS = ["quantize", "train", "evaluate", "merge"]
ALL_TASKS = GPU_TASKS + [
    "prepare-dataset",
    "start-tracking",
    "decide-training",
    "register-model",
    "finish-tracking",
]


def compiled(tmp_path: Path | None = None, env: dict | None = None) -> tuple[dict, dict]:
    path = ROOT / "pipelines" / "compiled" / "qlora_finetune.yaml"
    if env is not None:
        code = f"from qlora_kfp.app.compile import compile_all; compile_all({str(tmp_path)!r})"
        subprocess.run(
            [sys.executable, "-c", code], check=True, cwd=ROOT, env={"PATH": "/usr/bin:/bin", **env}
        )
        path = tmp_path / "qlora_finetune.yaml"
    spec, platform = yaml.safe_load_all(path.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def executor(spec: dict, task: str) -> str:
    for comp in spec["components"].values():
        for name, t in comp.get("dag", {}).get("tasks", {}).items():
            if name == task:
                return spec["components"][t["componentRef"]["name"]]["executorLabel"]
    for name, t in spec["root"]["dag"]["tasks"].items():
        if name == task:
            return spec["components"][t["componentRef"]["name"]]["executorLabel"]
    raise KeyError(task)


def task_spec(spec: dict, task: str) -> dict:
    for comp in [spec["root"], *spec["components"].values()]:
        if task in comp.get("dag", {}).get("tasks", {}):
            return comp["dag"]["tasks"][task]
    raise KeyError(task)


POOLS = [
    # By default only the GPU request places the pod: no label a cluster may lack.
    pytest.param({}, "nvidia.com/gpu", {}, DEFAULT_TOL, id="default"),
    pytest.param(
        {
            "gpu_accelerator": "nvidia.com/mig-3g.40gb",
            "gpu_node_selector": {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
            "gpu_tolerations": [{"key": "dedicated", "value": "gpu", "effect": "NoExecute"}],
        },
        "nvidia.com/mig-3g.40gb",
        {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
        [{"key": "dedicated", "value": "gpu", "effect": "NoExecute"}],
        id="another-pool-per-run",
    ),
]


# The sweep has no merge task.
PIPELINE_GPU_TASKS = [("qlora_finetune", t) for t in GPU_TASKS] + [
    ("qlora_sweep", t) for t in GPU_TASKS if t != "merge"
]


@pytest.mark.parametrize("params,accelerator,selector,tolerations", POOLS)
@pytest.mark.parametrize("pipeline,task", PIPELINE_GPU_TASKS)
def test_gpu_tasks_land_on_the_pool_the_run_names(
    pipeline, task, params, accelerator, selector, tolerations
):
    """One uploaded pipeline serves several GPU pools: accelerator, node selector and
    tolerations are run parameters, resolved per task the way the backend's driver does."""
    from support.kfp_backend import BackendRun

    path = ROOT / "pipelines" / "compiled" / f"{pipeline}.yaml"
    spec, platform = yaml.safe_load_all(path.read_text())
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    run = BackendRun(spec, params={"base_model": "m", "data_source": "d", **params})
    ex = executor(spec, task)
    res = spec["deploymentSpec"]["executors"][ex]["container"]["resources"]
    acc = res["accelerator"]
    assert (run.resource(task, acc["resourceType"]), acc["resourceCount"]) == (accelerator, "1")
    assert (res["resourceMemoryLimit"], res["resourceCpuRequest"]) == ("64Gi", "4")
    assert run.k8s_value(task, k8s[ex]["nodeSelector"]["nodeSelectorJson"]) == selector
    assert [run.k8s_value(task, t["tolerationJson"]) for t in k8s[ex]["tolerations"]] == [
        tolerations
    ]
    assert k8s[ex]["emptyDirMounts"] == [
        {"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": "16Gi", "volumeName": "dshm"},
        {"mountPath": "/scratch", "sizeLimit": "200Gi", "volumeName": "scratch"},
    ]
    retry = task_spec(spec, task)["retryPolicy"]
    assert retry["maxRetryCount"] == 3 and retry["backoffDuration"] == "60s"


# Argo's retryStrategy.backoff.maxDuration counts from the first attempt's start and is every
# attempt's pod deadline (workflow/controller/operator.go processNodeRetries), so it must
# outlast all attempts of a real stage: a 70B train or merge runs for a day or more.
LONGEST_STAGE_S = 24 * 3600


@pytest.mark.parametrize("task", GPU_TASKS)
def test_retries_outlast_the_longest_stage(task):
    spec, _ = compiled()
    retry = task_spec(spec, task)["retryPolicy"]
    window = int(retry["backoffMaxDuration"].rstrip("s"))
    assert window >= (retry["maxRetryCount"] + 1) * LONGEST_STAGE_S, retry


@pytest.mark.parametrize("task", ALL_TASKS)
def test_credentials_come_from_the_secret_never_parameters(task):
    spec, k8s = compiled()
    ex = executor(spec, task)
    env = {e["envVar"] for s in k8s[ex]["secretAsEnv"] for e in s["keyToEnv"]}
    assert {
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "QLORA_KFP_MLFLOW_TRACKING_PASSWORD",
    } <= env
    assert k8s[ex]["secretAsEnv"][0]["secretName"] == "qlora-kfp-credentials"
    cm = {e["envVar"] for s in k8s[ex]["configMapAsEnv"] for e in s["keyToEnv"]}
    assert "QLORA_KFP_MLFLOW_TRACKING_URI" in cm
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert not {p for p in params if "secret" in p or "password" in p or "key" in p.lower()}


@pytest.mark.parametrize(
    "task,cached",
    [
        ("prepare-dataset", True),
        ("quantize", True),
        ("train", False),
        ("evaluate", False),
        ("merge", False),
        ("start-tracking", False),
    ],
)
def test_caching_per_task(task, cached):
    spec, _ = compiled()
    assert task_spec(spec, task)["cachingOptions"].get("enableCache", False) is cached


def test_compile_time_options_for_another_cluster(tmp_path):
    spec, k8s = compiled(
        tmp_path,
        {
            "QLORA_KFP_GPUS": "2",
            "QLORA_KFP_CACHE_PVC": "model-cache",
            "QLORA_KFP_SECRET": "my-creds",
            "QLORA_KFP_SCRATCH_SIZE": "",
        },
    )
    ex = executor(spec, "train")
    assert k8s[ex]["pvcMount"][0]["mountPath"] == "/cache"
    assert k8s[ex]["secretAsEnv"][0]["secretName"] == "my-creds"
    assert [m["volumeName"] for m in k8s[ex]["emptyDirMounts"]] == ["dshm"]
    res = spec["deploymentSpec"]["executors"][ex]["container"]["resources"]
    assert res["accelerator"]["resourceCount"] == "2"
    # Preflight estimates memory for the train task's DDP processes: one per GPU it gets.
    for task in ("preflight", "train"):
        env = spec["deploymentSpec"]["executors"][executor(spec, task)]["container"]["env"]
        assert {"name": "QLORA_KFP_GPUS", "value": "2"} in env


@pytest.mark.parametrize("task", ["prepare-dataset", "quantize"])
def test_cached_tasks_are_keyed_by_the_content_fingerprint(task):
    spec, _ = compiled()
    src = task_spec(spec, task)["inputs"]["parameters"]["cache_fingerprint"]
    producer = src.get("taskOutputParameter", {}).get("producerTask") or src.get(
        "componentInputParameter"
    )
    assert producer in ("fingerprint-sources", "pipelinechannel--fingerprint-sources-Output")
    assert task_spec(spec, "fingerprint-sources")["cachingOptions"].get("enableCache") is not True


# What KFP 2.17's MLflow plugin may inject into a task's container as plain values
# (backend/src/v2/common/plugins/mlflow/handler.go RetrieveUserContainerEnvVars, and
# backend/src/common/plugins/mlflow/config.go BuildCredentialEnvVars for its credentials).
PLUGIN_INJECTS = {
    "MLFLOW_RUN_ID",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_EXPERIMENT_ID",
    "MLFLOW_WORKSPACE",
    "MLFLOW_TRACKING_AUTH",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
}


@pytest.mark.parametrize("task", ALL_TASKS)
def test_no_env_var_collides_with_the_mlflow_plugins(task):
    """Argo merges the driver's pod-spec patch into the container by env var name: a name
    both here (from a Secret or ConfigMap) and injected by the plugin becomes one EnvVar with
    value and valueFrom, which Kubernetes refuses, failing every pod of the run."""
    spec, k8s = compiled()
    ex = executor(spec, task)
    names = {e["envVar"] for s in k8s[ex].get("secretAsEnv", []) for e in s["keyToEnv"]}
    names |= {e["envVar"] for s in k8s[ex].get("configMapAsEnv", []) for e in s["keyToEnv"]}
    names |= {e["name"] for e in k8s[ex].get("fieldPathAsEnv", [])}
    names |= {
        e["name"] for e in spec["deploymentSpec"]["executors"][ex]["container"].get("env", [])
    }
    assert not names & PLUGIN_INJECTS


@pytest.mark.parametrize(
    "environ,expected",
    [
        pytest.param(
            {
                "QLORA_KFP_MLFLOW_TRACKING_URI": "http://mlflow:5000",
                "QLORA_KFP_MLFLOW_TRACKING_PASSWORD": "pw",
            },
            {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "MLFLOW_TRACKING_PASSWORD": "pw"},
            id="no-plugin-ours-adopted",
        ),
        pytest.param(
            {
                "MLFLOW_TRACKING_URI": "http://plugin:5000",
                "MLFLOW_TRACKING_AUTH": "kubernetes",
                "QLORA_KFP_MLFLOW_TRACKING_URI": "http://mlflow:5000",
                "QLORA_KFP_MLFLOW_TRACKING_PASSWORD": "pw",
            },
            {"MLFLOW_TRACKING_URI": "http://plugin:5000", "MLFLOW_TRACKING_AUTH": "kubernetes"},
            id="plugin-injected-nothing-of-ours-mixed-in",
        ),
        pytest.param({}, {}, id="nothing-set"),
    ],
)
def test_a_task_adopts_the_clusters_mlflow_settings(environ, expected):
    from qlora_kfp.tasks import adopt_mlflow_env

    adopt_mlflow_env(environ)
    assert {k: v for k, v in environ.items() if k.startswith("MLFLOW_")} == expected
