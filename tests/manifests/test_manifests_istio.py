"""The Istio component (manifests/components/istio) in a Kubeflow profile namespace.

What a profile namespace holds besides our objects, reproduced from the sources:
- ``ns-owner-access-istio``, the ALLOW policy the profile controller writes
  (kubeflow/kubeflow components/profile-controller/controllers/profile_controller.go,
  getAuthorizationPolicy);
- ``global-deny-all`` in the root namespace (kubeflow/manifests
  common/istio/istio-install/base/deny_all_authorizationpolicy.yaml), so a workload with a
  sidecar refuses whatever no ALLOW policy admits;
- sidecar injection for our pods (MLflow, PostgreSQL), none for pipeline pods (KFP annotates
  them ``sidecar.istio.io/inject: "false"``): they speak plaintext and carry no identity.

The decisions follow Istio's documented semantics (istio.io, reference/config/security:
authorization-policy and peer_authentication): CUSTOM/DENY before ALLOW; with any ALLOW
policy on a workload a request must match one; a rule matches when its from, to and when all
match; a plaintext peer has no principal and no namespace; PeerAuthentication modes resolve
port > workload > namespace > mesh, PERMISSIVE by default. NetworkPolicy follows
kubernetes.io/docs/concepts/services-networking/network-policies.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import pytest
from support.kube import kustomize

NS = "kubeflow-user-example-com"
ROOT_NS = "istio-system"
OWNER = "user@example.com"
ISTIO_KINDS = ("AuthorizationPolicy", "PeerAuthentication")

PROFILE_POLICY = {
    "kind": "AuthorizationPolicy",
    "metadata": {"name": "ns-owner-access-istio", "namespace": NS},
    "spec": {
        "action": "ALLOW",
        "rules": [
            {
                "when": [{"key": "request.headers[kubeflow-userid]", "values": [OWNER]}],
                "from": [
                    {
                        "source": {
                            "principals": [
                                "cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account",
                                "cluster.local/ns/kubeflow/sa/ml-pipeline-ui",
                            ]
                        }
                    }
                ],
            },
            {"when": [{"key": "source.namespace", "values": [NS]}]},
            {"to": [{"operation": {"paths": ["/healthz", "/metrics", "/wait-for-drain"]}}]},
            {
                "from": [
                    {
                        "source": {
                            "principals": [
                                "cluster.local/ns/kubeflow/sa/notebook-controller-service-account"
                            ]
                        }
                    }
                ],
                "to": [{"operation": {"methods": ["GET"], "paths": ["*/api/kernels"]}}],
            },
        ],
    },
}
GLOBAL_DENY_ALL = {
    "kind": "AuthorizationPolicy",
    "metadata": {"name": "global-deny-all", "namespace": ROOT_NS},
    "spec": {},
}
MESH_STRICT = {
    "kind": "PeerAuthentication",
    "metadata": {"name": "default", "namespace": ROOT_NS},
    "spec": {"mtls": {"mode": "STRICT"}},
}
MLFLOW = {"app.kubernetes.io/name": "mlflow"}
MLFLOW_DB = {"app.kubernetes.io/name": "mlflow-db"}


@dataclass
class Peer:
    """Who opens the connection: a pod's namespace and labels, and its mTLS identity (None for
    a pod without a sidecar)."""

    namespace: str
    labels: dict = field(default_factory=dict)
    principal: str | None = None


PIPELINE_POD = Peer(NS, {"pipelines.kubeflow.org/v2_component": "true"})
NOTEBOOK = Peer(NS, {"notebook-name": "nb"}, f"cluster.local/ns/{NS}/sa/default-editor")
OTHER_PROFILE = Peer("kubeflow-user-other", {}, None)
GATEWAY = Peer(
    ROOT_NS,
    {"app": "istio-ingressgateway"},
    "cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account",
)


@dataclass
class Request:
    peer: Peer
    labels: dict  # the destination workload's labels (in NS)
    port: int
    path: str = "/api/2.0/mlflow/runs/create"
    method: str = "POST"
    headers: dict = field(default_factory=dict)


def selects(policy: dict, labels: dict) -> bool:
    match = (policy["spec"].get("selector") or {}).get("matchLabels") or {}
    return all(labels.get(k) == v for k, v in match.items())


def applies(policy: dict, labels: dict) -> bool:
    """A policy in the root namespace applies mesh-wide, else to its own namespace."""
    return policy["metadata"]["namespace"] in (ROOT_NS, NS) and selects(policy, labels)


def any_match(patterns: list[str] | None, value: str | None) -> bool:
    """Istio string match: exact, prefix*, *suffix or *; a missing field matches anything."""
    if patterns is None:
        return True
    return value is not None and any(fnmatch.fnmatchcase(value, p) for p in patterns)


def source_matches(src: dict, peer: Peer) -> bool:
    ns = peer.namespace if peer.principal else None  # plaintext: no peer identity at all
    return any_match(src.get("principals"), peer.principal) and any_match(src.get("namespaces"), ns)


def operation_matches(op: dict, req: Request) -> bool:
    return (
        any_match(op.get("ports"), str(req.port))
        and any_match(op.get("paths"), req.path)
        and any_match(op.get("methods"), req.method)
    )


def condition_matches(cond: dict, req: Request) -> bool:
    key = cond["key"]
    if key == "source.namespace":
        value = req.peer.namespace if req.peer.principal else None
    elif key.startswith("request.headers["):
        value = req.headers.get(key[len("request.headers[") : -1])
    else:
        raise AssertionError(f"condition {key} is not modelled")
    return any_match(cond.get("values"), value)


def rule_matches(rule: dict, req: Request) -> bool:
    froms, tos = rule.get("from"), rule.get("to")
    return (
        (froms is None or any(source_matches(f["source"], req.peer) for f in froms))
        and (tos is None or any(operation_matches(t["operation"], req) for t in tos))
        and all(condition_matches(c, req) for c in rule.get("when", []))
    )


def mtls_mode(peer_auths: list[dict], labels: dict, port: int) -> str:
    """port-level (workload) > workload > namespace > mesh (root namespace) > PERMISSIVE."""

    def mode(spec: dict) -> str | None:
        m = (spec.get("mtls") or {}).get("mode")
        return None if m in (None, "UNSET") else m

    workload = [p for p in peer_auths if p["spec"].get("selector") and applies(p, labels)]
    for p in workload:
        level = (p["spec"].get("portLevelMtls") or {}).get(str(port))
        if level and level.get("mode") not in (None, "UNSET"):
            return level["mode"]
    for scope in (
        workload,
        *(
            [
                p
                for p in peer_auths
                if not p["spec"].get("selector") and p["metadata"]["namespace"] == ns
            ]
            for ns in (NS, ROOT_NS)
        ),
    ):
        for p in scope:
            if mode(p["spec"]):
                return mode(p["spec"])
    return "PERMISSIVE"


def istio_allows(objects: list[dict], req: Request) -> bool:
    """Whether MLflow's (or PostgreSQL's) sidecar lets ``req`` through."""
    peer_auths = [o for o in objects if o["kind"] == "PeerAuthentication"]
    if req.peer.principal is None and mtls_mode(peer_auths, req.labels, req.port) == "STRICT":
        return False
    policies = [o for o in objects if o["kind"] == "AuthorizationPolicy" and applies(o, req.labels)]
    by_action = {
        a: [p for p in policies if p["spec"].get("action", "ALLOW") == a] for a in ("DENY", "ALLOW")
    }
    if any(rule_matches(r, req) for p in by_action["DENY"] for r in p["spec"].get("rules", [])):
        return False
    if not by_action["ALLOW"]:
        return True
    return any(rule_matches(r, req) for p in by_action["ALLOW"] for r in p["spec"].get("rules", []))


def network_allows(objects: list[dict], req: Request) -> bool:
    """Ingress NetworkPolicies of the destination's namespace: not selected, all allowed;
    selected, allowed when some rule's peers and ports both match."""
    selecting = [
        o
        for o in objects
        if o["kind"] == "NetworkPolicy"
        and "Ingress" in o["spec"].get("policyTypes", ["Ingress"])
        and all(
            req.labels.get(k) == v
            for k, v in o["spec"]["podSelector"].get("matchLabels", {}).items()
        )
    ]
    if not selecting:
        return True

    def peer_ok(p: dict) -> bool:
        pods = p.get("podSelector")
        nss = p.get("namespaceSelector")
        ns_labels = {"kubernetes.io/metadata.name": req.peer.namespace}
        ns_ok = (
            all(ns_labels.get(k) == v for k, v in nss.get("matchLabels", {}).items())
            if nss is not None
            else req.peer.namespace == NS
        )
        pod_ok = pods is None or all(
            req.peer.labels.get(k) == v for k, v in pods.get("matchLabels", {}).items()
        )
        return ns_ok and pod_ok

    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            port_ok = ports is None or any(p.get("port") == req.port for p in ports)
            from_ok = "from" not in rule or any(peer_ok(p) for p in rule["from"])
            if port_ok and from_ok:
                return True
    return False


def reaches(objects: list[dict], req: Request) -> bool:
    return network_allows(objects, req) and istio_allows(objects, req)


@pytest.fixture(scope="module")
def istio_overlay():
    return kustomize("manifests/overlays/example-istio")


def profile_namespace(ours: list[dict], mesh_strict: bool) -> list[dict]:
    extra = [PROFILE_POLICY, GLOBAL_DENY_ALL] + ([MESH_STRICT] if mesh_strict else [])
    return [o for o in ours if o["kind"] in (*ISTIO_KINDS, "NetworkPolicy")] + extra


def test_component_objects_are_accepted_by_the_api_server(kube, istio_overlay):
    """Applied (a dry run) to a real API server holding Istio 1.29's CRDs: their schemas and
    CEL rules, with unknown fields refused."""
    objects = [d for d in istio_overlay if d["kind"] in ISTIO_KINDS]
    assert {d["kind"] for d in objects} == set(ISTIO_KINDS)
    assert {d["metadata"]["namespace"] for d in objects} == {NS}
    kube.namespace(NS)
    assert kube.refused(objects, dry_run=True) == {}


@pytest.mark.parametrize(
    "kind,spec,refusal",
    [
        pytest.param(
            "PeerAuthentication",
            lambda s: {"portLevelMtls": s["portLevelMtls"]},
            "portLevelMtls requires selector",
            id="port-level-mtls-without-selector",
        ),
        pytest.param(
            "AuthorizationPolicy",
            lambda s: {**s, "action": "PERMIT"},
            'spec.action: Unsupported value: "PERMIT"',
            id="unknown-action",
        ),
        pytest.param(
            "AuthorizationPolicy",
            lambda s: {**s, "port": 5000},
            ".spec.port: field not declared in schema",
            id="unknown-field",
        ),
    ],
)
def test_the_api_server_refuses_what_istio_refuses(kube, istio_overlay, kind, spec, refusal):
    kube.namespace(NS)
    doc = next(d for d in istio_overlay if d["kind"] == kind)
    resp = kube.apply({**doc, "spec": spec(doc["spec"])}, dry_run=True)
    assert not resp.ok and refusal in resp.json()["message"]


@pytest.mark.parametrize("mesh_strict", [False, True], ids=["permissive-mesh", "strict-mesh"])
def test_pipeline_pods_reach_mlflow_only_with_the_component(istio_overlay, mesh_strict):
    with_component = profile_namespace(istio_overlay, mesh_strict)
    without = profile_namespace(kustomize("manifests/overlays/example"), mesh_strict)
    req = Request(PIPELINE_POD, MLFLOW, 5000)
    assert not reaches(without, req), "the premise: a profile refuses sidecar-less pods"
    assert reaches(with_component, req)


@pytest.mark.parametrize(
    "req,expected",
    [
        (Request(PIPELINE_POD, MLFLOW, 5000, "/api/2.0/mlflow/runs/get", "GET"), True),
        (Request(NOTEBOOK, MLFLOW, 5000), True),
        (Request(GATEWAY, MLFLOW, 5000, "/", "GET", {"kubeflow-userid": OWNER}), True),
        (Request(PIPELINE_POD, MLFLOW_DB, 5432, "", "GET"), False),
        (Request(PIPELINE_POD, MLFLOW, 15000, "/", "GET"), False),
        (Request(OTHER_PROFILE, MLFLOW, 5000), False),
        (
            Request(
                Peer(
                    "kubeflow-user-other",
                    {},
                    "cluster.local/ns/kubeflow-user-other/sa/default-editor",
                ),
                MLFLOW,
                5000,
            ),
            False,
        ),
    ],
    ids=[
        "pipeline-pod-get",
        "notebook-with-sidecar",
        "owner-through-gateway",
        "pipeline-pod-to-postgres",
        "pipeline-pod-other-port",
        "other-namespace-plaintext",
        "other-namespace-mtls",
    ],
)
def test_the_component_opens_mlflow_port_to_the_namespace_and_nothing_more(
    istio_overlay, req, expected
):
    assert reaches(profile_namespace(istio_overlay, mesh_strict=True), req) is expected


def test_model_refuses_what_istio_refuses():
    req = Request(PIPELINE_POD, MLFLOW, 5000)
    assert not istio_allows([GLOBAL_DENY_ALL], req)  # `spec: {}`: ALLOW with no rule
    assert istio_allows([], req)  # no policy at all: allowed
    assert not istio_allows([MESH_STRICT], req)  # plaintext under STRICT
    assert istio_allows([MESH_STRICT], Request(NOTEBOOK, MLFLOW, 5000))
