"""Who applies what: the profile owner's part and the cluster admin's part (issue N6).

A Kubeflow profile owner is bound to the `kubeflow-edit` ClusterRole: Kubernetes' built-in
`edit` role plus Kubeflow's own kinds and read access to Istio policies. Here the owner is a
user bound to the built-in `edit` role alone, in the namespace (a RoleBinding, as the profile
controller makes one), and applies the manifests for real to a real API server
(tests/support/kube_apiserver.py): what `edit` refuses is what a cluster admin must apply
(``manifests/overlays/<overlay>/admin``); the owner's part (``.../owner``) must go through whole.
"""

from __future__ import annotations

import re

import pytest
from support.kube import ROOT, kustomize, kustomize_into
from support.kube_api import Kube
from support.kube_apiserver import OWNER

OVERLAYS = [
    "manifests/overlays/example",
    "manifests/overlays/example-istio",
    "manifests/overlays/example-trainjob",
]


def keys(docs: list[dict]) -> set[str]:
    return {f"{d['kind']}/{d['metadata']['name']}" for d in docs}


def owner_of(kube: Kube, cluster, namespace: str) -> Kube:
    """A new namespace whose only grant to OWNER is the built-in `edit` role; the API server
    as OWNER (with OWNER's own static token, no impersonation)."""
    kube.namespace(namespace)
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "owner-edit", "namespace": namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": OWNER}],
    }
    assert kube.apply(binding).ok
    return kube.with_token(cluster.owner_token)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.rsplit("/", 1)[1])
def test_the_two_parts_are_the_whole_overlay(overlay):
    owner, admin = kustomize(f"{overlay}/owner"), kustomize(f"{overlay}/admin")
    assert not keys(owner) & keys(admin)
    assert keys(owner) | keys(admin) == keys(kustomize(overlay))


def test_an_edit_user_is_refused_exactly_the_admin_part(kube, kube_cluster, tmp_path):
    """The whole Istio overlay applied by the owner: every refusal is RBAC's (403), and the
    refused objects are the admin part, no more and no less."""
    namespace = "owner-applies-everything"
    owner = owner_of(kube, kube_cluster, namespace)
    overlay = "manifests/overlays/example-istio"
    docs = kustomize_into(overlay, namespace, tmp_path)
    refused = owner.refused(docs)
    assert all(f'User "{OWNER}" cannot patch resource' in m for m in refused.values()), refused
    assert set(refused) == keys(kustomize(f"{overlay}/admin"))
    assert set(refused) == {
        "Role/qlora-kfp-runner",
        "RoleBinding/qlora-kfp-runner",
        "ResourceQuota/qlora-kfp-gpu",
        "LimitRange/qlora-kfp-defaults",
        "AuthorizationPolicy/mlflow-pipeline-pods",
        "PeerAuthentication/mlflow-pipeline-pods",
    }


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.rsplit("/", 1)[1])
def test_admin_then_owner_apply_their_parts_whole(kube, kube_cluster, tmp_path, overlay):
    """The README's order: the cluster admin's part first (the LimitRange must be there before
    the owner's pods), then the owner's, each accepted whole and stored."""
    namespace = f"parts-{overlay.rsplit('/', 1)[1]}"
    owner = owner_of(kube, kube_cluster, namespace)
    (tmp_path / "admin").mkdir()
    (tmp_path / "owner").mkdir()
    admin_docs = kustomize_into(f"{overlay}/admin", namespace, tmp_path / "admin")
    owner_docs = kustomize_into(f"{overlay}/owner", namespace, tmp_path / "owner")
    assert kube.refused(admin_docs) == {}
    assert owner.refused(owner_docs) == {}
    for doc in admin_docs + owner_docs:
        assert kube.request("GET", kube.path(doc)).ok, f"{doc['kind']}/{doc['metadata']['name']}"


def test_the_readme_has_the_admin_apply_its_part_before_the_owner():
    """The deploy guide's and the README's quickstart commands name the parts, admin first,
    and each renders."""
    for page in ("docs/deploy.md", "README.md"):
        text = (ROOT / page).read_text()
        commands = re.findall(r"`kubectl apply -k (manifests/overlays/<yours>\S*)`", text)
        assert commands[:2] == [
            "manifests/overlays/<yours>/admin",
            "manifests/overlays/<yours>/owner",
        ], page
        for command in commands:
            for overlay in OVERLAYS:
                assert kustomize(command.replace("manifests/overlays/<yours>", overlay))
