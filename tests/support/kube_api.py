"""A small client of the real API server (tests/support/kube_apiserver.py): apply, create and ask.

Every write sends ``fieldValidation=Strict`` (an unknown or duplicate field is an error, as
``kubectl apply`` asks by default) and may be a server-side dry run: the object then goes
through authentication, authorization, defaulting, admission and validation, and is not stored.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import requests

SCHEMAS = Path(__file__).resolve().parent / "schemas"
FIELD_MANAGER = "qlora-kfp-tests"

# What the README grants the qlora-kfp-runner service account, as (verb, group, resource, name or "" for any).
GRANTED = {
    ("get", "", "configmaps", "kfp-launcher"),
    ("get", "", "secrets", "mlpipeline-minio-artifact"),
    ("get", "", "pods", ""),
    ("create", "argoproj.io", "workflowtaskresults", ""),
    ("patch", "argoproj.io", "workflowtaskresults", ""),
}


class Kube:
    """One identity's view of the API server: a bearer token, optionally impersonating."""

    def __init__(self, url: str, ca: Path, token: str, impersonate: dict | None = None):
        self.url, self.ca, self.token = url, ca, token
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"
        self.session.headers.update(impersonate or {})
        self._resources: dict[str, dict[str, tuple[str, bool]]] = {}

    def with_token(self, token: str) -> Kube:
        return Kube(self.url, self.ca, token)

    def impersonating(self, user: str) -> Kube:
        """This identity acting as ``user`` (the Impersonate-User header ``kubectl --as``
        sends; the API server checks that this identity may impersonate)."""
        return Kube(self.url, self.ca, self.token, {"Impersonate-User": user})

    def request(self, method: str, path: str, body=None, **kwargs) -> requests.Response:
        if body is not None:
            kwargs["data"] = json.dumps(body)
            kwargs.setdefault("headers", {}).setdefault("Content-Type", "application/json")
        # verify on each call: a session's own is overridden by REQUESTS_CA_BUNDLE.
        kwargs.setdefault("verify", str(self.ca))
        return self.session.request(method, self.url + path, timeout=30, **kwargs)

    def ok(self, method: str, path: str, body=None, **kwargs) -> dict:
        resp = self.request(method, path, body, **kwargs)
        assert resp.ok, f"{method} {path}: {resp.status_code} {resp.text}"
        return resp.json()

    def _resource(self, api_version: str, kind: str) -> tuple[str, bool]:
        """(plural, namespaced) of ``kind`` from the server's discovery document."""
        if kind not in self._resources.get(api_version, {}):
            base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
            found = self.ok("GET", base)["resources"]
            self._resources[api_version] = {
                r["kind"]: (r["name"], r["namespaced"]) for r in found if "/" not in r["name"]
            }
        return self._resources[api_version][kind]

    def path(self, doc: dict, named: bool = True) -> str:
        api_version = doc["apiVersion"]
        plural, namespaced = self._resource(api_version, doc["kind"])
        path = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
        if namespaced:
            path += f"/namespaces/{doc['metadata']['namespace']}"
        path += f"/{plural}"
        return f"{path}/{doc['metadata']['name']}" if named else path

    def apply(self, doc: dict, dry_run: bool = False) -> requests.Response:
        """Server-side apply (what ``kubectl apply --server-side`` sends)."""
        params = {"fieldManager": FIELD_MANAGER, "fieldValidation": "Strict", "force": "true"}
        if dry_run:
            params["dryRun"] = "All"
        headers = {"Content-Type": "application/apply-patch+yaml"}
        return self.request("PATCH", self.path(doc), doc, params=params, headers=headers)

    def create(self, doc: dict, dry_run: bool = False) -> requests.Response:
        params = {"fieldValidation": "Strict", **({"dryRun": "All"} if dry_run else {})}
        return self.request("POST", self.path(doc, named=False), doc, params=params)

    def refused(self, docs: list[dict], dry_run: bool = False) -> dict[str, str]:
        """Apply each object; ``{"Kind/name": the server's message}`` for those refused."""
        out = {}
        for doc in docs:
            resp = self.apply(doc, dry_run)
            if not resp.ok:
                out[f"{doc['kind']}/{doc['metadata']['name']}"] = resp.json()["message"]
        return out

    def refusal(self, doc: dict) -> str:
        """Why the server refuses to create ``doc`` (a dry run); "" when it admits it."""
        deadline = time.monotonic() + 5
        while True:
            resp = self.create(doc, dry_run=True)
            message = "" if resp.ok else resp.json()["message"]
            # ResourceQuota admission reads quotas from its informer's cache, which sees the
            # status the controller manager wrote a moment later: until then it answers this.
            if "status unknown for quota" not in message or time.monotonic() > deadline:
                return message
            time.sleep(0.1)

    def can_i(self, verb: str, resource: str, namespace: str, group: str = "", name: str = ""):
        """SelfSubjectAccessReview: whether this identity may make the request (the question
        ``kubectl auth can-i`` asks)."""
        attrs = {"verb": verb, "group": group, "resource": resource, "namespace": namespace}
        if name:
            attrs["name"] = name
        review = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectAccessReview",
            "spec": {"resourceAttributes": attrs},
        }
        path = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"
        return self.ok("POST", path, review)["status"]["allowed"]

    def service_account_token(self, namespace: str, name: str) -> str:
        """A token for the service account (TokenRequest, what the kubelet mounts in a pod)."""
        path = f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token"
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {}}
        return self.ok("POST", path, body)["status"]["token"]

    def namespace(self, name: str) -> None:
        """A namespace, once the controller manager gave it its ``default`` service account
        (without which the ServiceAccount admission plugin refuses every pod)."""
        ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
        assert self.apply(ns).ok
        self._wait(f"/api/v1/namespaces/{name}/serviceaccounts/default", lambda obj: True)

    def wait_quotas_counted(self, namespace: str) -> None:
        """Until the controller manager has counted every quota of ``namespace``: ResourceQuota
        admission refuses every pod while a quota's status is unknown."""
        path = f"/api/v1/namespaces/{namespace}/resourcequotas"
        for quota in self.ok("GET", path)["items"]:
            hard = set(quota["spec"]["hard"])
            self._wait(
                f"{path}/{quota['metadata']['name']}",
                lambda q, hard=hard: set((q.get("status") or {}).get("used") or {}) >= hard,
            )

    def _wait(self, path: str, done, timeout_s: float = 30) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            resp = self.request("GET", path)
            if resp.ok and done(resp.json()):
                return resp.json()
            assert time.monotonic() < deadline, f"{path}: {resp.status_code} {resp.text[:500]}"
            time.sleep(0.1)

    def install_crds(self, schema_file: str) -> list[str]:
        """The CRDs of tests/support/schemas/<schema_file> (vendor_crds.py), until they serve."""
        return self.apply_crds(crds_from_schemas(schema_file))

    def apply_crds(self, crds: list[dict]) -> list[str]:
        """Apply CustomResourceDefinitions and wait until each is established (serves)."""
        for crd in crds:
            resp = self.apply(crd)
            assert resp.ok, f"{crd['metadata']['name']}: {resp.status_code} {resp.text[:500]}"
        for crd in crds:
            self._wait(self.path(crd), _established)
        return [c["metadata"]["name"] for c in crds]


def _established(crd: dict) -> bool:
    conditions = (crd.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)


def _plural(kind: str) -> str:
    lower = kind.lower()
    return lower[:-1] + "ies" if lower.endswith("y") else lower + "s"


def crds_from_schemas(schema_file: str) -> list[dict]:
    """CustomResourceDefinitions built from the vendored per-version schemas: namespaced, each
    version served, v1 (else the only version) stored."""
    kinds = json.loads((SCHEMAS / schema_file).read_text())["kinds"]
    by_crd: dict[tuple[str, str], list[tuple[str, dict]]] = {}
    for key, schema in kinds.items():
        group, version, kind = key.split("/")
        by_crd.setdefault((group, kind), []).append((version, schema))
    crds = []
    for (group, kind), versions in sorted(by_crd.items()):
        names = [v for v, _ in versions]
        storage = "v1" if "v1" in names else names[0]
        crds.append(
            {
                "apiVersion": "apiextensions.k8s.io/v1",
                "kind": "CustomResourceDefinition",
                "metadata": {"name": f"{_plural(kind)}.{group}"},
                "spec": {
                    "group": group,
                    "scope": "Namespaced",
                    "names": {
                        "kind": kind,
                        "listKind": f"{kind}List",
                        "plural": _plural(kind),
                        "singular": kind.lower(),
                    },
                    "versions": [
                        {
                            "name": v,
                            "served": True,
                            "storage": v == storage,
                            "schema": {"openAPIV3Schema": copy.deepcopy(s)},
                        }
                        for v, s in versions
                    ],
                },
            }
        )
    return crds


def pod(namespace: str, spec: dict, name: str = "run-pod") -> dict:
    """A Pod of ``spec`` (an image added to each container that has none)."""
    spec = copy.deepcopy(spec)
    for container in spec.get("initContainers", []) + spec["containers"]:
        container.setdefault("image", "registry.example.com/any:1")
    meta = {"name": name, "namespace": namespace}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


def workload_pods(docs: list[dict]) -> list[tuple[str, dict]]:
    """The first pod of each of the manifests' Deployments and StatefulSets. A StatefulSet's
    pod also mounts a claim per volumeClaimTemplate, named <template>-<set>-<ordinal>
    (pkg/controller/statefulset/stateful_set_utils.go, updateStorage)."""
    pods = []
    for d in docs:
        if d["kind"] not in ("Deployment", "StatefulSet"):
            continue
        spec = copy.deepcopy(d["spec"]["template"]["spec"])
        for claim in d["spec"].get("volumeClaimTemplates", []):
            name = claim["metadata"]["name"]
            volume = {"claimName": f"{name}-{d['metadata']['name']}-0"}
            spec.setdefault("volumes", []).append({"name": name, "persistentVolumeClaim": volume})
        pods.append((f"{d['kind']}/{d['metadata']['name']}", spec))
    return pods


def rules(kube, namespace: str) -> set[tuple]:
    """Every (verb, group, resource, name) this identity may use in ``namespace``
    (SelfSubjectRulesReview), rules with several verbs or names split up."""
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectRulesReview",
        "spec": {"namespace": namespace},
    }
    path = "/apis/authorization.k8s.io/v1/selfsubjectrulesreviews"
    found = set()
    for rule in kube.ok("POST", path, review)["status"]["resourceRules"]:
        for verb in rule["verbs"]:
            for group in rule.get("apiGroups", [""]):
                for resource in rule.get("resources", []):
                    for name in rule.get("resourceNames") or [""]:
                        found.add((verb, group, resource, name))
    return found
