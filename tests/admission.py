"""What the API server does to a pod on create, in order: API defaulting, the LimitRanger
admission plugin, validation of requests against limits, then ResourceQuota admission.

Each step mirrors the kubernetes/kubernetes (1.33) file named in its docstring; the model is
no friendlier than the API server (tests/test_manifests_quota.py checks it refuses what
Kubernetes refuses).
"""

from __future__ import annotations

import copy
from decimal import Decimal

from kubernetes.utils.quantity import parse_quantity


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
