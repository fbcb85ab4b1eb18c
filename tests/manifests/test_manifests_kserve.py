"""The KServe example (manifests/examples/kserve) as KServe 0.20 would take it.

The InferenceService is applied (a dry run) to a real API server with KServe's CRD schema
installed (tests/support/schemas, tests/support/kube_apiserver.py); what KServe's
controller then does with it is modelled from kserve/kserve v0.20.0: the credentials it finds
through the predictor's service account (pkg/credentials/service_account_credentials.go,
pkg/credentials/s3/s3_secret.go and utils.go, with the defaults of
config/configmap/inferenceservice.yaml), and the predictor pod it builds (the runtime's
container merged with the model's, the storage initializer), which the real API server must
admit in the namespace holding the example overlay's LimitRange and quota.
"""

from __future__ import annotations

import copy

import pytest
from support.kube import ROOT, find, kustomize
from support.kube_api import pod

EXAMPLE = "manifests/examples/kserve"
# config/configmap/inferenceservice.yaml `credentials.s3` (also in Kubeflow's KServe install).
S3_CONFIG = {
    "s3AccessKeyIDName": "AWS_ACCESS_KEY_ID",
    "s3SecretAccessKeyName": "AWS_SECRET_ACCESS_KEY",
}
# config/runtimes/kserve-huggingfaceserver.yaml: the runtime container's own resources.
RUNTIME = {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "1", "memory": "2Gi"}}
# config/configmap/inferenceservice.yaml `storageInitializer`.
STORAGE_INITIALIZER = {
    "requests": {"cpu": "100m", "memory": "100Mi"},
    "limits": {"cpu": "1", "memory": "1Gi"},
}
# knative-serving config-deployment (serverless mode): queue-sidecar-cpu-request 25m, no other.
QUEUE_PROXY = {"requests": {"cpu": "25m"}}


@pytest.fixture(scope="module")
def docs():
    return kustomize(EXAMPLE)


def isvc(docs):
    return find(docs, "InferenceService", "qlora-finetune")


def annotation_or_data(secret: dict, annotation: str, key: str, default: str = "") -> str:
    """utils.go getEnvValue: the Secret's annotation, else its data key, else the config."""
    data = secret.get("stringData") or {}
    return (secret["metadata"].get("annotations") or {}).get(annotation, data.get(key, default))


def kserve_s3_env(docs: list[dict]) -> dict[str, str]:
    """CreateSecretVolumeAndEnvFromServiceAccount: each Secret the service account lists that
    holds the secret-key entry gives the storage initializer its S3 environment."""
    predictor = isvc(docs)["spec"]["predictor"]
    sa = find(docs, "ServiceAccount", predictor.get("serviceAccountName", "default"))
    env = {}
    for ref in sa.get("secrets", []):
        secret = find(docs, "Secret", ref["name"])  # mountSecretCredential: Get, else error
        data = secret.get("stringData") or {}
        if S3_CONFIG["s3SecretAccessKeyName"] not in data:
            continue
        # BuildSecretEnvs: secretKeyRef on both keys (a missing one fails the pod's start).
        assert S3_CONFIG["s3AccessKeyIDName"] in data, "no access key id in the Secret"
        env["AWS_ACCESS_KEY_ID"] = data[S3_CONFIG["s3AccessKeyIDName"]]
        env["AWS_SECRET_ACCESS_KEY"] = data[S3_CONFIG["s3SecretAccessKeyName"]]
        endpoint = annotation_or_data(secret, "serving.kserve.io/s3-endpoint", "S3_ENDPOINT")
        if endpoint:
            # getEndpointConfiguration: a scheme in the endpoint wins, else s3-usehttps (https
            # unless "0").
            if endpoint.startswith(("http://", "https://")):
                env["AWS_ENDPOINT_URL"] = endpoint
            else:
                https = annotation_or_data(secret, "serving.kserve.io/s3-usehttps", "S3_USE_HTTPS")
                scheme = "http" if https == "0" else "https"
                env["AWS_ENDPOINT_URL"] = f"{scheme}://{endpoint}"
        region = annotation_or_data(secret, "serving.kserve.io/s3-region", "AWS_DEFAULT_REGION")
        if region:
            env["AWS_DEFAULT_REGION"] = region
    return env


def merged(runtime: dict, model: dict) -> dict:
    """MergeRuntimeContainers (strategic merge): requests and limits merge key by key, the
    InferenceService's values over the runtime's."""
    out = copy.deepcopy(runtime)
    for part in ("requests", "limits"):
        out.setdefault(part, {}).update(model.get(part, {}))
    return out


def predictor_pod(docs: list[dict]) -> dict:
    model = isvc(docs)["spec"]["predictor"]["model"]
    return {
        "initContainers": [{"name": "storage-initializer", "resources": STORAGE_INITIALIZER}],
        "containers": [
            {"name": "kserve-container", "resources": merged(RUNTIME, model.get("resources", {}))},
            {"name": "queue-proxy", "resources": QUEUE_PROXY},
        ],
    }


def test_the_example_is_accepted_by_the_api_server(kube, example_namespace, docs):
    assert {d["metadata"]["namespace"] for d in docs} == {example_namespace}
    assert kube.refused(docs, dry_run=True) == {}


def test_the_api_server_refuses_what_kserve_refuses(kube, example_namespace, docs):
    bad = copy.deepcopy(isvc(docs))
    model = bad["spec"]["predictor"]["model"]
    model["storageURI"] = model.pop("storageUri")
    resp = kube.apply(bad, dry_run=True)
    # Server-side apply reports a field its schema lacks as a 500, "field not declared".
    assert not resp.ok and ".spec.predictor.model.storageURI: field not declared" in resp.text
    bad = copy.deepcopy(isvc(docs))
    del bad["spec"]["predictor"]["model"]["modelFormat"]["name"]
    resp = kube.apply(bad, dry_run=True)
    assert (
        resp.status_code == 422 and "spec.predictor.model.modelFormat.name: Required" in resp.text
    )


def test_huggingface_runtime_serves_the_merged_model_of_a_run(docs, monkeypatch):
    """storageUri is where the merge stage publishes (RunContext.artifact_uri, the source of the
    registered model version) under the pipeline overlay's QLORA_KFP_ARTIFACT_URI."""
    from qlora_kfp.tasks.context import RunContext

    model = isvc(docs)["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "huggingface"
    overlay = kustomize("manifests/overlays/example")
    uri = find(overlay, "ConfigMap", "qlora-kfp-config")["data"]["QLORA_KFP_ARTIFACT_URI"]
    assert '"merged-model"' in (ROOT / "qlora_kfp/tasks/stage_tasks.py").read_text()
    monkeypatch.setenv("QLORA_KFP_ARTIFACT_URI", uri)
    assert model["storageUri"] == RunContext("RUN_ID").artifact_uri("merged-model")


def test_storage_initializer_gets_the_pipelines_object_store(docs):
    env = kserve_s3_env(docs)
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env), "KServe finds no S3 keys"
    config = find(kustomize("manifests/overlays/example"), "ConfigMap", "qlora-kfp-config")["data"]
    assert env["AWS_ENDPOINT_URL"] == config["AWS_ENDPOINT_URL"]
    assert env["AWS_DEFAULT_REGION"] == config["AWS_DEFAULT_REGION"]


def test_predictor_pod_passes_the_namespace_quota_and_limit_range(kube, example_namespace, docs):
    assert kube.refusal(pod(example_namespace, predictor_pod(docs))) == ""


def test_the_runtime_merge_is_modelled(kube, example_namespace, docs):
    """Without its own cpu limit the model's cpu request (4) meets the runtime's limit (1)."""
    spec = predictor_pod(docs)
    del spec["containers"][0]["resources"]["limits"]["cpu"]
    spec["containers"][0]["resources"] = merged(RUNTIME, spec["containers"][0]["resources"])
    refusal = kube.refusal(pod(example_namespace, spec))
    assert "must be less than or equal to cpu limit of 1" in refusal
