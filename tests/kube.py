"""What Kubernetes does with the manifests, done offline: render them and resolve a container's
environment, command and arguments the way the kubelet does.

Each rule mirrors the Kubernetes source file named beside it (kubernetes/kubernetes, 1.33).
"""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def kustomize(path: str) -> list[dict]:
    """``kubectl kustomize <path>`` (offline), as a list of objects."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is needed for `kubectl kustomize` (it works offline)")
    out = subprocess.run(
        [kubectl, "kustomize", str(ROOT / path)], check=True, capture_output=True, text=True
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


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


# --- custom resources: the CRD's structural schema, then its CEL rules ---------------------

SCHEMAS = ROOT / "tests" / "schemas"


def _strict(schema):
    """Unknown fields are errors, as with `kubectl apply` (server-side field validation
    Strict): an object schema with properties and no preserve-unknown-fields allows no others."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


# The CRDs' x-kubernetes-validations rules (CEL), each as the Python it means. A rule not
# listed here fails the check: a new upstream rule must be read and added, never skipped.
CEL_RULES = {
    '!self.contains("*")': lambda s: "*" not in s,
    "(has(self.selector) ? 1 : 0) + (has(self.targetRef) ? 1 : 0) + "
    "(has(self.targetRefs) ? 1 : 0) <= 1": lambda s: (
        sum(k in s for k in ("selector", "targetRef", "targetRefs")) <= 1
    ),
    "(has(self.serviceAccounts) || has(self.notServiceAccounts)) ? (!has(self.principals) &&\n"
    "!has(self.notPrincipals) && !has(self.namespaces) && !has(self.notNamespaces)) : true": (
        lambda s: (
            not ({"serviceAccounts", "notServiceAccounts"} & set(s))
            or not ({"principals", "notPrincipals", "namespaces", "notNamespaces"} & set(s))
        )
    ),
    "has(self.portLevelMtls) ? (((has(self.selector) && has(self.selector.matchLabels)) ? "
    "self.selector.matchLabels : {}).size() > 0) : true": lambda s: (
        "portLevelMtls" not in s or bool((s.get("selector") or {}).get("matchLabels"))
    ),
    'self.all(key, !key.contains("*"))': lambda s: all("*" not in k for k in s),
    "self.all(key, 0 < int(key) && int(key) <= 65535)": lambda s: all(
        0 < int(k) <= 65535 for k in s
    ),
    "self.all(key, key.size() != 0)": lambda s: all(len(k) != 0 for k in s),
    "self.size() == 0": lambda s: len(s) == 0,
}


def _cel_errors(schema: dict, value, path: str) -> list[str]:
    errors = []
    for rule in schema.get("x-kubernetes-validations", []):
        check = CEL_RULES.get(rule["rule"])
        if check is None:
            errors.append(f"{path}: CEL rule not modelled in tests/kube.py: {rule['rule']!r}")
        elif not check(value):
            errors.append(f"{path}: {rule.get('message', rule['rule'])}")
    if isinstance(value, dict):
        for key, sub in value.items():
            child = schema.get("properties", {}).get(key)
            if child is None and isinstance(schema.get("additionalProperties"), dict):
                child = schema["additionalProperties"]
            if child is not None:
                errors += _cel_errors(child, sub, f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, sub in enumerate(value):
            errors += _cel_errors(schema["items"], sub, f"{path}[{i}]")
    return errors


def custom_resource_errors(doc: dict, schema_file: str) -> list[str]:
    """Why the API server would refuse ``doc``, a custom resource, by its CRD's schema (from
    tests/schemas/<schema_file>, see vendor_crds.py); [] when it would accept it."""
    import json

    import jsonschema

    kinds = json.loads((SCHEMAS / schema_file).read_text())["kinds"]
    key = f"{doc['apiVersion']}/{doc['kind']}"
    if key not in kinds:
        return [f"{key}: no such kind/version in {schema_file} ({sorted(kinds)})"]
    schema = kinds[key]
    # apiVersion, kind and metadata belong to every object; a CRD's schema may leave them out.
    meta = {
        "apiVersion": {"type": "string"},
        "kind": {"type": "string"},
        "metadata": {"type": "object"},
    }
    root = {**schema, "properties": {**meta, **schema.get("properties", {})}}
    validator = jsonschema.Draft7Validator(_strict(root))
    errors = [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]
    return errors + _cel_errors(schema, doc, doc["kind"])
