"""The manifests rendered offline, and what the kubelet (which cannot run here) does with them:
resolve a container's environment, command and arguments.

Each kubelet rule mirrors the Kubernetes source file named beside it (kubernetes/kubernetes,
1.33). What the API server does with the manifests is asked of a real one (kube_api.py).
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def kustomize_into(path: str, namespace: str, work: Path) -> list[dict]:
    """``path`` rendered into another namespace, through an overlay as a user writes one."""
    (work / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"namespace: {namespace}\n"
        # kustomize takes no absolute path to a kustomization: the overlay, relative to here.
        f"resources:\n  - {os.path.relpath(ROOT / path, work)}\n"
    )
    return kustomize(str(work))


def kustomize(path: str) -> list[dict]:
    """``kubectl kustomize <path>`` (offline), as a list of objects."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is needed for `kubectl kustomize` (it works offline)")
    out = subprocess.run(
        [kubectl, "kustomize", str(ROOT / path)], check=True, capture_output=True, text=True
    ).stdout
    # libyaml's loader where PyYAML has it: 10 times faster on CRDs (2 MB: 0.3 s, not 3 s).
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return [d for d in yaml.load_all(out, Loader=loader) if d]


def find(docs: list[dict], kind: str, name: str) -> dict:
    """The one object of ``kind`` named ``name``."""
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(hits) == 1, f"{kind}/{name}: {len(hits)} found"
    return hits[0]


def expand(text: str, lookup) -> str:
    """``$(VAR)`` expansion of env values, command and args.

    third_party/forked/golang/expansion/expand.go: ``$$`` is a literal ``$``; ``$(NAME)`` is
    replaced when NAME is defined and kept as written when it is not; any other ``$`` stays.
    """
    out, i = [], 0
    while i < len(text):
        if text[i] == "$" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt == "$":
                out.append("$")
                i += 2
                continue
            if nxt == "(":
                end = text.find(")", i + 2)
                if end != -1:
                    name = text[i + 2 : end]
                    value = lookup(name)
                    out.append(f"$({name})" if value is None else value)
                    i = end + 1
                    continue
                out.append("$(")
                i += 2
                continue
            out.append("$" + nxt)
            i += 2
            continue
        out.append(text[i])
        i += 1
    return "".join(out)


def _data(obj: dict) -> dict[str, str]:
    """A Secret's or ConfigMap's values as the container sees them (stringData wins)."""
    if obj["kind"] == "Secret":
        data = {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
        return {**data, **(obj.get("stringData") or {})}
    return dict(obj.get("data") or {})


def service_links(docs: list[dict], namespace: str, cluster_ip: str) -> dict[str, str]:
    """The variables ``enableServiceLinks`` (on by default) adds for each Service of the
    namespace (pkg/kubelet/envvars/envvars.go, FromServices): ``<NAME>_SERVICE_HOST``,
    ``<NAME>_SERVICE_PORT`` and the Docker-link style ``<NAME>_PORT=tcp://<ip>:<port>``."""
    env = {}
    for svc in docs:
        if svc["kind"] != "Service" or svc["metadata"].get("namespace") != namespace:
            continue
        name = svc["metadata"]["name"].upper().replace("-", "_")
        port = svc["spec"]["ports"][0]
        proto = port.get("protocol", "TCP")
        env[f"{name}_SERVICE_HOST"] = cluster_ip
        env[f"{name}_SERVICE_PORT"] = str(port["port"])
        env[f"{name}_PORT"] = f"{proto.lower()}://{cluster_ip}:{port['port']}"
        env[f"{name}_PORT_{port['port']}_{proto}"] = env[f"{name}_PORT"]
    return env


def container_env(
    docs: list[dict], pod: dict, container: dict, namespace: str, cluster_ip: str = "10.96.0.10"
) -> dict[str, str]:
    """The environment the kubelet gives ``container`` (pkg/kubelet/kubelet_pods.go,
    makeEnvironmentVariables): envFrom first, in order (later sources win, ``prefix``
    prepended), then ``env`` in order, each value expanded against what is defined so far and
    the service links; last the service links no declared variable overrides.
    """
    links = (
        service_links(docs, namespace, cluster_ip) if pod.get("enableServiceLinks", True) else {}
    )
    env: dict[str, str] = {}

    def lookup(name: str) -> str | None:
        return env.get(name, links.get(name))

    for src in container.get("envFrom", []):
        ref = src.get("secretRef") or src.get("configMapRef")
        kind = "Secret" if "secretRef" in src else "ConfigMap"
        for key, value in _data(find(docs, kind, ref["name"])).items():
            env[src.get("prefix", "") + key] = value
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = expand(var["value"], lookup)
            continue
        ref = var["valueFrom"]
        if "fieldRef" in ref:
            path = ref["fieldRef"]["fieldPath"]
            assert path == "metadata.namespace", f"fieldRef {path} is not modelled here"
            env[var["name"]] = namespace
        else:
            key_ref = ref.get("secretKeyRef") or ref.get("configMapKeyRef")
            kind = "Secret" if "secretKeyRef" in ref else "ConfigMap"
            env[var["name"]] = _data(find(docs, kind, key_ref["name"]))[key_ref["key"]]
    return {**links, **env}


def container_argv(container: dict, env: dict[str, str]) -> list[str]:
    """command + args with ``$(VAR)`` expanded against the container's own environment
    (pkg/kubelet/container/helpers.go, ExpandContainerCommandAndArgs)."""
    return [expand(a, env.get) for a in container.get("command", []) + container.get("args", [])]
