"""The quota and LimitRange against the pods a run really creates.

A KFP 2.17 run on Argo Workflows 4 creates, per task, a driver pod and an executor pod. Beside
the container our pipeline sizes (``main``), Argo adds its ``init`` and ``wait`` containers,
which KFP's workflow-controller-configmap gives no resources, and KFP adds its ``kfp-launcher``
init container. KFP and Argo cannot run here, so those pods are built as they build them (each
rule citing its Go file); what the API server then does with them is the real one's answer: each
pod is created (a server-side dry run) in the namespace where the example overlay's LimitRange
and ResourceQuota were applied (tests/support/kube_apiserver.py).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from support.kfp_task_pod import main_resources
from support.kube import ROOT, find, kustomize
from support.kube_api import pod, workload_pods

PIPELINES = sorted((ROOT / "pipelines/compiled").glob("*.yaml"))

# kubeflow/pipelines 2.17.0 backend/src/v2/compiler/argocompiler/argo.go: driverResources and
# launcherResources (the kfp-launcher init container).
DRIVER = {"limits": {"memory": "0.5Gi", "cpu": "0.5"}, "requests": {"memory": "64Mi", "cpu": "0.1"}}
LAUNCHER = {"limits": {"memory": "256Mi", "cpu": "0.5"}, "requests": {"cpu": "0.1"}}
# argo-workflows v4 workflow/controller/workflowpod.go newExecContainer: the executor's
# resources come from the controller config, which KFP's
# manifests/kustomize/third-party/argo/base/workflow-controller-configmap-patch.yaml leaves empty.
ARGO_EXECUTOR: dict = {}


def argo(name: str) -> dict:
    return {"name": name, "resources": copy.deepcopy(ARGO_EXECUTOR)}


def run_pods() -> list[tuple[str, dict]]:
    """(id, pod spec) for the driver and executor pod of every task of both pipelines."""
    pods = []
    for path in PIPELINES:
        spec = next(yaml.safe_load_all(path.read_text()))
        params = spec["root"].get("inputDefinitions", {}).get("parameters", {})
        defaults = {k: v["defaultValue"] for k, v in params.items() if "defaultValue" in v}
        for name, executor in spec["deploymentSpec"]["executors"].items():
            if "container" not in executor:
                continue
            main = {
                "name": "main",
                "resources": main_resources(executor["container"]["resources"], defaults),
            }
            launcher = {"name": "kfp-launcher", "resources": copy.deepcopy(LAUNCHER)}
            pods.append(
                (
                    f"{path.stem}/{name}",
                    {
                        "initContainers": [argo("init"), launcher],
                        "containers": [argo("wait"), main],
                    },
                )
            )
            driver = {"name": "main", "resources": copy.deepcopy(DRIVER)}
            pods.append(
                (
                    f"{path.stem}/{name}-driver",
                    {"initContainers": [argo("init")], "containers": [argo("wait"), driver]},
                )
            )
    return pods


POD_CASES = run_pods() + workload_pods(kustomize("manifests/overlays/example"))


def gpu_quota() -> int:
    docs = kustomize("manifests/overlays/example")
    return int(
        find(docs, "ResourceQuota", "qlora-kfp-gpu")["spec"]["hard"]["requests.nvidia.com/gpu"]
    )


@pytest.mark.parametrize("spec", [s for _, s in POD_CASES], ids=[i for i, _ in POD_CASES])
def test_every_pod_of_a_run_is_admitted(kube, example_namespace, spec):
    assert kube.refusal(pod(example_namespace, spec)) == ""


@pytest.mark.parametrize(
    "spec,refusal",
    [
        pytest.param(
            {"containers": [{"name": "main", "resources": {"limits": {"nvidia.com/gpu": "64"}}}]},
            "exceeded quota: qlora-kfp-gpu, requested: requests.nvidia.com/gpu=64",
            id="gpus-over-the-quota",
        ),
        pytest.param(
            {"containers": [{"name": "main", "resources": {"limits": {"memory": "600Gi"}}}]},
            "exceeded quota: qlora-kfp-gpu, requested: requests.memory=600Gi",
            id="memory-requests-over-the-quota",
        ),
        pytest.param(
            {"containers": [{"name": "main", "resources": {"limits": {"memory": "2Ti"}}}]},
            "exceeded quota: qlora-kfp-gpu, requested: limits.memory=2Ti",
            id="memory-limits-over-the-quota",
        ),
        pytest.param(
            {
                "containers": [
                    {
                        "name": "main",
                        "resources": {"requests": {"memory": "2Gi"}, "limits": {"memory": "1Gi"}},
                    }
                ]
            },
            "must be less than or equal to memory limit of 1Gi",
            id="request-above-its-limit",
        ),
    ],
)
def test_the_namespace_refuses_pods_beyond_its_limits(kube, example_namespace, spec, refusal):
    """Each key of the quota is enforced (a `limits.nvidia.com/gpu` key would never be: the
    quota counts extended resources by `requests.` keys only), and an invalid pod stays
    invalid: the overlay's defaults do not paper over it."""
    assert refusal in kube.refusal(pod(example_namespace, spec))


def test_without_the_limit_range_argos_containers_fail_the_quota(kube):
    """Why the LimitRange is there: Argo's bare init and wait containers set no memory, and a
    memory quota makes the API server refuse such a pod."""
    namespace = "quota-without-limit-range"
    kube.namespace(namespace)
    quota = find(kustomize("manifests/overlays/example"), "ResourceQuota", "qlora-kfp-gpu")
    assert kube.apply({**quota, "metadata": {**quota["metadata"], "namespace": namespace}}).ok
    kube.wait_quotas_counted(namespace)
    spec = {"containers": [argo("wait"), {"name": "main", "resources": DRIVER}]}
    assert "must specify limits.memory for: wait; requests.memory for: wait" in kube.refusal(
        pod(namespace, spec)
    )


def test_a_task_that_asks_for_ephemeral_storage_is_not_capped_by_a_default(kube, example_namespace):
    """GPU tasks download models onto the node's disk: a request without a limit must be
    admitted (a default ephemeral-storage limit below it would make the pod invalid)."""
    resources = {"requests": {"cpu": "8", "ephemeral-storage": "200Gi"}}
    spec = {"containers": [argo("wait"), {"name": "main", "resources": resources}]}
    assert kube.refusal(pod(example_namespace, spec)) == ""


def test_the_quota_caps_the_accelerator_the_pipeline_asks_for(kube, example_namespace):
    """The train task of a run claiming one GPU more than the quota allows is refused."""
    (train,) = [s for i, s in POD_CASES if i == "qlora_finetune/exec-train"]
    main = next(c for c in train["containers"] if c["name"] == "main")
    gpus = [k for k in main["resources"]["limits"] if "/" in k]
    assert gpus, "the train task claims an accelerator"
    greedy = copy.deepcopy(train)
    next(c for c in greedy["containers"] if c["name"] == "main")["resources"]["limits"][gpus[0]] = (
        str(gpu_quota() + 1)
    )
    assert "exceeded quota: qlora-kfp-gpu" in kube.refusal(pod(example_namespace, greedy))


def test_pod_lists_are_complete():
    ids = [pid for pid, _ in run_pods()]
    assert any(i.endswith("exec-train") for i in ids) and any(i.endswith("-driver") for i in ids)
    assert {Path(p).stem for p in PIPELINES} == {"qlora_finetune", "qlora_sweep"}
