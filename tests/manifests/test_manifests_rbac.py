"""The qlora-kfp-runner service account can do what a run's pods do, and no more.

A run given ``service_account: qlora-kfp-runner`` runs every pod under it: KFP's driver and
launcher and Argo's executor then call the Kubernetes API with its token. Each call below is
one they make (kubeflow/pipelines 2.17.0 ``backend/src/v2``, argo-workflows
``docs/workflow-rbac.md``). The example overlay is applied to a real API server
(tests/support/kube_apiserver.py); each question is asked with a token the server issued to the
service account, and its RBAC authorizer answers.
"""

from __future__ import annotations

import pytest
from support.kube_api import GRANTED, pod, rules

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


@pytest.fixture(scope="module")
def runner(kube, example_namespace):
    """The API server as the runner's pods see it: with a token issued to the account."""
    return kube.with_token(kube.service_account_token(example_namespace, SA))


@pytest.mark.parametrize(
    "verb,group,resource,name,who",
    NEEDED,
    ids=[f"{v}-{r}-{n or 'new'}" for v, _, r, n, _ in NEEDED],
)
def test_runner_can_make_the_calls_of_a_run(
    runner, example_namespace, verb, group, resource, name, who
):
    assert runner.can_i(verb, resource, example_namespace, group, name), who


@pytest.mark.parametrize(
    "verb,group,resource,name", REFUSED, ids=[f"{v}-{r}-{n or 'any'}" for v, _, r, n in REFUSED]
)
def test_runner_gets_nothing_else(runner, example_namespace, verb, group, resource, name):
    assert not runner.can_i(verb, resource, example_namespace, group, name)


def test_runner_has_no_rule_beyond_the_calls_of_a_run(kube, runner, example_namespace):
    """All the server would allow the runner, less what any service account of the namespace
    gets (discovery, self reviews), is the calls of a run, one for one."""
    bare = kube.impersonating(f"system:serviceaccount:{example_namespace}:default")
    extra = rules(runner, example_namespace) - rules(bare, example_namespace)
    assert extra == GRANTED


def test_runner_token_is_mounted(kube, example_namespace):
    """The driver and launcher find their namespace in the mounted token's folder
    (v2/config/env.go InPodNamespace reads /var/run/secrets/kubernetes.io/serviceaccount/
    namespace) and authenticate with the token: a service account that opts out of mounting it
    fails every task. The ServiceAccount admission plugin mounts it into a run's pod."""
    spec = {"serviceAccountName": SA, "containers": [{"name": "main"}]}
    resp = kube.create(pod(example_namespace, spec), dry_run=True)
    assert resp.ok, resp.text
    mounts = resp.json()["spec"]["containers"][0].get("volumeMounts", [])
    assert "/var/run/secrets/kubernetes.io/serviceaccount" in {m["mountPath"] for m in mounts}
