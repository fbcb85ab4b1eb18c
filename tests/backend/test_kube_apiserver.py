"""The test API server itself (tests/support/kube_apiserver.py): the pinned release, authentication on,
and no silent skip when its binaries are missing."""

from __future__ import annotations

import re

import pytest
import requests
from support import kube_apiserver
from support.kube import ROOT


def test_the_server_is_the_release_go_mod_pins(kube):
    """`make backend` stamps the version from backend/kube/go.mod into the binary."""
    pinned = re.search(
        r"^\s*k8s\.io/kubernetes (v\S+)$", (ROOT / "backend/kube/go.mod").read_text(), re.M
    )
    assert kube.ok("GET", "/version")["gitVersion"] == pinned[1]


def test_an_unknown_token_is_refused(kube_cluster):
    resp = requests.get(
        f"{kube_cluster.url}/api/v1/namespaces",
        headers={"Authorization": "Bearer not-a-token"},
        verify=kube_cluster.ca,
        timeout=10,
    )
    assert resp.status_code == 401


def test_an_authenticated_user_without_a_role_gets_nothing(kube, kube_cluster):
    owner = kube.with_token(kube_cluster.owner_token)
    assert owner.request("GET", "/api/v1/namespaces/default/secrets").status_code == 403


def test_missing_binaries_fail_and_never_skip(tmp_path, monkeypatch):
    monkeypatch.setattr(kube_apiserver, "BIN", tmp_path)
    with (
        pytest.raises(FileNotFoundError, match="run `make backend`"),
        kube_apiserver.kube_apiserver(tmp_path / "work"),
    ):
        pytest.fail("started without binaries")
