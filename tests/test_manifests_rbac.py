"""The qlora-kfp-runner service account can do what a run's pods do, and no more.

A run given ``service_account: qlora-kfp-runner`` runs every pod under it: KFP's driver and
launcher and Argo's executor then call the Kubernetes API with its token. Each call below is
one they make (kubeflow/pipelines 2.17.0 ``backend/src/v2``, argo-workflows
``docs/workflow-rbac.md``); the authorizer mirrors Kubernetes RBAC
(pkg/apis/rbac/v1/evaluation_helpers.go, plugin/pkg/auth/authorizer/rbac/rbac.go).
"""

from __future__ import annotations

import pytest
from kube import find, kustomize

SA = "qlora-kfp-runner"

# (verb, API group, resource, name, who makes the call and where)
NEEDED = [
    ("get", "", "configmaps", "kfp-launcher", "driver+launcher: v2/config/env.go FromConfigMap"),
    (
        "get",
        "",
        "secrets",
        "mlpipeline-minio-artifact",
        "launcher: v2/objectstore/object_store.go getS3BucketCredential (default secret name)",
    ),
    ("get", "", "pods", "run-abc-123", "driver: v2/driver/k8s.go; launcher_v2.go retry index"),
    ("create", "argoproj.io", "workflowtaskresults", "", "argo wait container: task outputs"),
    ("patch", "argoproj.io", "workflowtaskresults", "run-abc-123", "argo wait container"),
]
REFUSED = [
    ("get", "", "secrets", "qlora-kfp-credentials"),  # reaches the pods as env, via the kubelet
    ("list", "", "secrets", ""),
    ("get", "", "configmaps", "qlora-kfp-config"),
    ("create", "", "pods", ""),
    ("delete", "", "pods", "run-abc-123"),
    ("patch", "argoproj.io", "workflows", "run-abc"),
]


def rule_allows(rule: dict, verb: str, group: str, resource: str, name: str) -> bool:
    """evaluation_helpers.go RuleAllows: verb, group, resource, then resourceNames (a rule
    with names never matches a request without one, e.g. create)."""

    def matches(values, value):
        return "*" in values or value in values

    names = rule.get("resourceNames") or []
    return (
        matches(rule.get("verbs", []), verb)
        and matches(rule.get("apiGroups", []), group)
        and matches(rule.get("resources", []), resource)
        and (not names or name in names)
    )


def allowed(docs: list[dict], verb: str, group: str, resource: str, name: str) -> bool:
    """rbac.go: any RoleBinding of the namespace naming the service account (a subject with no
    namespace means the binding's own) whose Role has a rule that allows the request."""
    for rb in (d for d in docs if d["kind"] == "RoleBinding"):
        ns = rb["metadata"].get("namespace")
        for subject in rb.get("subjects", []):
            if subject["kind"] == "ServiceAccount" and subject["name"] == SA:
                if subject.get("namespace", ns) != ns:
                    continue
                role = find(docs, rb["roleRef"]["kind"], rb["roleRef"]["name"])
                if any(rule_allows(r, verb, group, resource, name) for r in role["rules"]):
                    return True
    return False


@pytest.fixture(scope="module")
def docs():
    return kustomize("manifests/overlays/example")


@pytest.mark.parametrize(
    "verb,group,resource,name,who",
    NEEDED,
    ids=[f"{v}-{r}-{n or 'new'}" for v, _, r, n, _ in NEEDED],
)
def test_runner_can_make_the_calls_of_a_run(docs, verb, group, resource, name, who):
    assert allowed(docs, verb, group, resource, name), who


@pytest.mark.parametrize(
    "verb,group,resource,name", REFUSED, ids=[f"{v}-{r}-{n or 'any'}" for v, _, r, n in REFUSED]
)
def test_runner_gets_nothing_else(docs, verb, group, resource, name):
    assert not allowed(docs, verb, group, resource, name)


def test_runner_token_is_mounted(docs):
    """The driver and launcher find their namespace in the mounted token's folder
    (v2/config/env.go InPodNamespace reads /var/run/secrets/kubernetes.io/serviceaccount/
    namespace) and authenticate with the token: a service account that opts out of mounting it
    fails every task."""
    assert find(docs, "ServiceAccount", SA).get("automountServiceAccountToken", True) is True
