"""The quota and LimitRange against the pods a run really creates.

A KFP 2.17 run on Argo Workflows 4 creates, per task, a driver pod and an executor pod. Beside
the container our pipeline sizes (``main``), Argo adds its ``init`` and ``wait`` containers,
which KFP's workflow-controller-configmap gives no resources, and KFP adds its ``kfp-launcher``
init container. Each pod is put through what the API server does on create, in order: API
defaulting, the LimitRanger admission plugin, validation, then ResourceQuota admission; each
step mirrors the kubernetes/kubernetes (1.33) file named in its docstring.
"""

from __future__ import annotations

import copy
from decimal import Decimal
from pathlib import Path

import pytest
import yaml
from kube import ROOT, find, kustomize
from kubernetes.utils.quantity import parse_quantity

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


def main_resources(res: dict) -> dict:
    """backend/src/v2/driver/driver.go (initPodSpecPatch): the IR's resource fields as the
    main container's requests and limits; the accelerator becomes a limit only."""
    for value in map(str, res.values()):
        assert "{{" not in value, f"runtime resource {value}: resolve it here before checking"
    requests, limits = {}, {}
    for field, target, key in [
        ("resourceCpuRequest", requests, "cpu"),
        ("resourceCpuLimit", limits, "cpu"),
        ("resourceMemoryRequest", requests, "memory"),
        ("resourceMemoryLimit", limits, "memory"),
    ]:
        if field in res:
            target[key] = res[field]
    acc = res.get("accelerator")
    if acc:
        limits[acc.get("resourceType") or acc["type"]] = acc.get("resourceCount") or acc["count"]
    return {"requests": requests, "limits": limits}


def run_pods() -> list[tuple[str, dict]]:
    """(id, pod spec) for the driver and executor pod of every task of both pipelines."""
    pods = []
    for path in PIPELINES:
        spec = next(yaml.safe_load_all(path.read_text()))
        for name, executor in spec["deploymentSpec"]["executors"].items():
            if "container" not in executor:
                continue
            main = {"name": "main", "resources": main_resources(executor["container"]["resources"])}
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


def containers(pod: dict) -> list[dict]:
    return pod.get("initContainers", []) + pod["containers"]


def q(value) -> Decimal:
    return parse_quantity(value)


def is_native(name: str) -> bool:
    """pkg/apis/core/helper/helpers.go: IsNativeResource (no domain, or *kubernetes.io/)."""
    return "/" not in name or "kubernetes.io/" in name


def api_defaults(pod: dict) -> None:
    """pkg/apis/core/v1/defaults.go SetDefaults_Pod: a limit without a request sets the request
    (containers and init containers)."""
    for c in containers(pod):
        res = c.setdefault("resources", {})
        for key, value in res.get("limits", {}).items():
            res.setdefault("requests", {}).setdefault(key, value)


def limit_range_defaults(item: dict) -> tuple[dict, dict]:
    """pkg/apis/core/v1/defaults.go SetDefaults_LimitRangeItem (type Container): default limit
    from max, default request from the default limit, else from min."""
    default = {**item.get("max", {}), **item.get("default", {})}
    default_request = {**item.get("min", {}), **default, **item.get("defaultRequest", {})}
    return default, default_request


def limit_ranger(pod: dict, limit_ranges: list[dict]) -> list[str]:
    """plugin/pkg/admission/limitranger/admission.go: mergeContainerResources fills each
    container's missing limits and requests from the defaults, then min/max are enforced."""
    errors = []
    for lr in limit_ranges:
        for item in lr["spec"]["limits"]:
            if item["type"] != "Container":
                continue
            default, default_request = limit_range_defaults(item)
            for c in containers(pod):
                res = c.setdefault("resources", {})
                for key, value in default.items():
                    res.setdefault("limits", {}).setdefault(key, value)
                for key, value in default_request.items():
                    res.setdefault("requests", {}).setdefault(key, value)
                for key, low in item.get("min", {}).items():
                    if q(res.get("requests", {}).get(key, 0)) < q(low):
                        errors.append(f"{c['name']}: minimum {key} usage is {low}")
                for key, high in item.get("max", {}).items():
                    if key not in res.get("limits", {}) or q(res["limits"][key]) > q(high):
                        errors.append(f"{c['name']}: maximum {key} usage is {high}")
    return errors


def validate(pod: dict) -> list[str]:
    """pkg/apis/core/validation/validation.go ValidateResourceRequirements: a request is at most
    its limit; an extended resource (no overcommit) has a limit and a request equal to it."""
    errors = []
    for c in containers(pod):
        requests = c["resources"].get("requests", {})
        limits = c["resources"].get("limits", {})
        for key, request in requests.items():
            if key in limits and q(request) > q(limits[key]):
                errors.append(f"{c['name']}: {key} request {request} > limit {limits[key]}")
            if not is_native(key) and (key not in limits or q(request) != q(limits[key])):
                errors.append(f"{c['name']}: {key} request must equal its limit")
    return errors


# pkg/quota/v1/evaluator/core/pods.go: quota on these makes every container specify them.
VALIDATION_SET = {"cpu", "memory", "requests.cpu", "requests.memory", "limits.cpu", "limits.memory"}
STANDARD_QUOTA = {
    *VALIDATION_SET,
    *("ephemeral-storage", "requests.ephemeral-storage", "limits.ephemeral-storage"),
    *("requests.storage", "pods", "resourcequotas", "services", "replicationcontrollers"),
    *("secrets", "persistentvolumeclaims", "configmaps"),
    *("services.nodeports", "services.loadbalancers"),
}


def container_usage(res: dict) -> dict[str, Decimal]:
    """pods.go podComputeUsageHelper: what one request/limit set counts as."""
    requests, limits = res.get("requests", {}), res.get("limits", {})
    usage = {"pods": Decimal(1)}
    for native in ("cpu", "memory", "ephemeral-storage"):
        if native in requests:
            usage[f"requests.{native}"] = q(requests[native])
            if native != "ephemeral-storage":
                usage[native] = q(requests[native])
        if native in limits:
            usage[f"limits.{native}"] = q(limits[native])
    for key, value in requests.items():
        if not is_native(key):
            usage[f"requests.{key}"] = q(value)
    return usage


def quota_admit(pod: dict, quota: dict) -> list[str]:
    """plugin/pkg/admission/resourcequota (pods.go Constraints, then PodUsageFunc against the
    hard limits of an empty namespace): app containers add up, each init container is compared
    on its own (component-helpers resource.PodRequests)."""
    hard = quota["spec"]["hard"]
    required = set(hard) & VALIDATION_SET
    missing = set()
    for c in containers(pod):
        missing |= required - set(container_usage(c["resources"]))
    if missing:
        return [f"must specify {','.join(sorted(missing))}"]
    total: dict[str, Decimal] = {}
    for c in pod["containers"]:
        for key, value in container_usage(c["resources"]).items():
            total[key] = total.get(key, Decimal(0)) + value
    for c in pod.get("initContainers", []):
        for key, value in container_usage(c["resources"]).items():
            total[key] = max(total.get(key, Decimal(0)), value)
    return [
        f"exceeded quota: {key} {total[key]} > {value}"
        for key, value in hard.items()
        if key in total and total[key] > q(value)
    ]


def admit(pod: dict, docs: list[dict]) -> list[str]:
    pod = copy.deepcopy(pod)
    api_defaults(pod)
    errors = limit_ranger(pod, [d for d in docs if d["kind"] == "LimitRange"])
    errors += validate(pod)
    for quota in (d for d in docs if d["kind"] == "ResourceQuota"):
        errors += quota_admit(pod, quota)
    return errors


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
