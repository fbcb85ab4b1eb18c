"""The quota and LimitRange against the pods a run really creates.

A KFP 2.17 run on Argo Workflows 4 creates, per task, a driver pod and an executor pod. Beside
the container our pipeline sizes (``main``), Argo adds its ``init`` and ``wait`` containers,
which KFP's workflow-controller-configmap gives no resources, and KFP adds its ``kfp-launcher``
init container. Each pod goes through what the API server does on create (tests/admission.py).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml
from admission import STANDARD_QUOTA, admit, is_native
from kube import ROOT, find, kustomize

OVERLAYS = ["manifests/base", "manifests/overlays/example"]
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


PLACEHOLDER = re.compile(r"^\{\{\$\.inputs\.parameters\['pipelinechannel--(\w+)'\]\}\}$")


def resolve(value, defaults: dict) -> str:
    """A per-run resource value (``{{$.inputs.parameters['pipelinechannel--NAME']}}``, which
    the driver resolves from the run's parameters, driver.go resolvePodSpecInputRuntimeParameter)
    as a run with the pipeline's defaults gets it."""
    value = str(value)
    if "{{" not in value:
        return value
    match = PLACEHOLDER.match(value)
    assert match and match[1] in defaults, f"cannot resolve {value} from the pipeline defaults"
    return str(defaults[match[1]])


def main_resources(res: dict, defaults: dict) -> dict:
    """backend/src/v2/driver/driver.go (initPodSpecPatch): the IR's resource fields as the
    main container's requests and limits; the accelerator becomes a limit only."""
    requests, limits = {}, {}
    for field, target, key in [
        ("resourceCpuRequest", requests, "cpu"),
        ("resourceCpuLimit", limits, "cpu"),
        ("resourceMemoryRequest", requests, "memory"),
        ("resourceMemoryLimit", limits, "memory"),
    ]:
        if field in res:
            target[key] = resolve(res[field], defaults)
    acc = res.get("accelerator")
    if acc:
        kind = resolve(acc.get("resourceType") or acc["type"], defaults)
        limits[kind] = resolve(acc.get("resourceCount") or acc["count"], defaults)
    return {"requests": requests, "limits": limits}


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


def workload_pods(docs: list[dict]) -> list[tuple[str, dict]]:
    """The pods of the manifests' own Deployments and StatefulSets."""
    return [
        (f"{d['kind']}/{d['metadata']['name']}", copy.deepcopy(d["spec"]["template"]["spec"]))
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet")
    ]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_of_a_run_passes_limit_range_and_quota(overlay):
    docs = kustomize(overlay)
    assert any(d["kind"] == "ResourceQuota" for d in docs)
    rejected = {
        pid: err for pid, pod in run_pods() + workload_pods(docs) if (err := admit(pod, docs))
    }
    assert not rejected, rejected


def test_a_task_that_asks_for_ephemeral_storage_is_not_capped_by_a_default():
    """GPU tasks download models onto the node's disk: a request without a limit must be
    admitted (a default ephemeral-storage limit below it would make the pod invalid)."""
    docs = kustomize("manifests/overlays/example")
    pod = {
        "containers": [
            argo("wait"),
            {"name": "main", "resources": {"requests": {"cpu": "8", "ephemeral-storage": "200Gi"}}},
        ]
    }
    assert admit(pod, docs) == []


def test_the_admission_model_rejects_what_kubernetes_rejects():
    """The model is no friendlier than the API server: Argo's bare containers fail the quota
    alone, a request above its limit is invalid, a GPU over quota is refused."""
    docs = kustomize("manifests/overlays/example")
    quota_only = [d for d in docs if d["kind"] != "LimitRange"]
    bare = {"containers": [argo("wait"), {"name": "main", "resources": DRIVER}]}
    assert admit(bare, quota_only) == ["must specify limits.memory,requests.memory"]
    over = {"containers": [{"name": "main", "resources": {"requests": {"memory": "2Gi"}}}]}
    over["containers"][0]["resources"]["limits"] = {"memory": "1Gi"}
    assert admit(over, docs) == ["main: memory request 2Gi > limit 1Gi"]
    gpus = find(docs, "ResourceQuota", "qlora-kfp-gpu")["spec"]["hard"]["requests.nvidia.com/gpu"]
    greedy = {"containers": [{"name": "main", "resources": {"limits": {"nvidia.com/gpu": "64"}}}]}
    assert admit(greedy, docs) == [f"exceeded quota: requests.nvidia.com/gpu 64 > {gpus}"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_quota_keys_are_counted_by_kubernetes(overlay):
    """pkg/apis/core/validation ValidateResourceQuotaResourceName accepts any domain-qualified
    name, but the pod evaluator counts an extended resource only as `requests.<name>`
    (pods.go isExtendedResourceNameForQuota): a `limits.nvidia.com/gpu` key is never enforced."""
    for quota in (d for d in kustomize(overlay) if d["kind"] == "ResourceQuota"):
        for key in quota["spec"]["hard"]:
            if is_native(key):
                assert key in STANDARD_QUOTA or key.startswith("requests.hugepages-"), key
            else:
                assert key.startswith("requests."), f"{key} is never counted"


def test_the_quota_caps_the_accelerator_the_pipeline_asks_for():
    docs = kustomize("manifests/overlays/example")
    hard = find(docs, "ResourceQuota", "qlora-kfp-gpu")["spec"]["hard"]
    asked = {
        key
        for _, pod in run_pods()
        for c in pod["containers"]
        for key in c["resources"].get("limits", {})
        if not is_native(key)
    }
    assert asked and {f"requests.{key}" for key in asked} <= set(hard)


def test_pod_lists_are_complete():
    ids = [pid for pid, _ in run_pods()]
    assert any(i.endswith("exec-train") for i in ids) and any(i.endswith("-driver") for i in ids)
    assert {Path(p).stem for p in PIPELINES} == {"qlora_finetune", "qlora_sweep"}
