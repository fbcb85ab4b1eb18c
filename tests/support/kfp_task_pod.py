"""The pod a KFP 2.17 run makes for a task of our compiled pipelines, as the backend makes it.

KFP cannot run here, so the train task's executor pod is built from the compiled pipeline the
way the backend builds it, each rule citing its Go file (kubeflow/pipelines 2.17.0):

* the main container's image, command and ``env`` values: the IR's container spec
  (backend/src/v2/compiler/argocompiler/container.go);
* its resources: the IR's resource fields (``main_resources`` below,
  backend/src/v2/driver/driver.go initPodSpecPatch);
* Secret and ConfigMap keys as env, field paths as env, emptyDir volumes, node selector and
  tolerations: the kubernetes platform spec (backend/src/v2/driver/k8s.go
  extendPodSpecPatch), with the run's parameters at the pipeline's defaults;
* ``KFP_POD_NAME``/``KFP_POD_UID`` (argocompiler/common.go commonEnvs), the ``kfp-launcher``
  volume (container.go) and Argo's ``var-run-argo`` volume and ``wait`` container.
"""

from __future__ import annotations

import re

import yaml

from support.kube import ROOT

PIPELINE = ROOT / "pipelines/compiled/qlora_finetune.yaml"

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


def _resolved(value, defaults: dict):
    """A platform-spec value given as ``{"componentInputParameter": ...}`` at its default."""
    if isinstance(value, dict) and "componentInputParameter" in value:
        return defaults[value["componentInputParameter"].removeprefix("pipelinechannel--")]
    return value


def task_pod(
    namespace: str, task: str = "train", name: str = "run-1-train", run_id: str = "run-1"
) -> dict:
    """The executor pod of ``task`` (``exec-<task>``) in ``namespace``, as a Pod object."""
    ir, platform = list(yaml.safe_load_all(PIPELINE.read_text()))
    params = ir["root"].get("inputDefinitions", {}).get("parameters", {})
    defaults = {k: v["defaultValue"] for k, v in params.items() if "defaultValue" in v}
    container = ir["deploymentSpec"]["executors"][f"exec-{task}"]["container"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"][f"exec-{task}"]
    env = [dict(e) for e in container.get("env", [])]
    for source, ref, key in (
        ("secretAsEnv", "secretKeyRef", "secretKey"),
        ("configMapAsEnv", "configMapKeyRef", "configMapKey"),
    ):
        for item in k8s.get(source, []):
            obj = item.get("secretName") or item.get("configMapName")
            for pair in item["keyToEnv"]:
                sel = {"name": obj, "key": pair[key], "optional": item.get("optional", False)}
                env.append({"name": pair["envVar"], "valueFrom": {ref: sel}})
    for item in k8s.get("fieldPathAsEnv", []):
        env.append(
            {"name": item["name"], "valueFrom": {"fieldRef": {"fieldPath": item["fieldPath"]}}}
        )
    # Argo's executor (argo-workflows workflow/controller/workflowpod.go) sets its own.
    env.append({"name": "ARGO_CONTAINER_NAME", "value": "main"})
    for field, path in (("KFP_POD_NAME", "metadata.name"), ("KFP_POD_UID", "metadata.uid")):
        env.append({"name": field, "valueFrom": {"fieldRef": {"fieldPath": path}}})
    volumes = [{"name": "kfp-launcher", "emptyDir": {}}, {"name": "var-run-argo", "emptyDir": {}}]
    mounts = [
        {"name": "kfp-launcher", "mountPath": "/kfp-launcher"},
        {"name": "var-run-argo", "mountPath": "/var/run/argo"},
    ]
    for item in k8s.get("emptyDirMounts", []):
        empty = {k: item[k] for k in ("medium", "sizeLimit") if k in item}
        volumes.append({"name": item["volumeName"], "emptyDir": empty})
        mounts.append({"name": item["volumeName"], "mountPath": item["mountPath"]})
    spec = {
        "serviceAccountName": "qlora-kfp-runner",
        "containers": [
            {"name": "wait", "image": "quay.io/argoproj/argoexec:v3.7.3"},
            {
                "name": "main",
                "image": container["image"],
                "command": ["/kfp-launcher/launch", "--copy", "/kfp-launcher/launch"],
                "env": env,
                "resources": main_resources(container["resources"], defaults),
                "volumeMounts": mounts,
            },
        ],
        "volumes": volumes,
        "restartPolicy": "Never",
    }
    selector = k8s.get("nodeSelector", {}).get("nodeSelectorJson")
    if selector is not None and (labels := _resolved(selector, defaults)):
        spec["nodeSelector"] = labels
    tolerations = []
    for item in k8s.get("tolerations", []):
        value = _resolved(item.get("tolerationJson"), defaults)
        tolerations += value if isinstance(value, list) else [value]
    if tolerations:
        spec["tolerations"] = tolerations
    meta = {"name": name, "namespace": namespace, "labels": {"pipeline/runid": run_id}}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}
