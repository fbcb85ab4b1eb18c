"""The MLflow Deployment as `kubectl kustomize` renders it, checked against the real server.

The container's command, arguments and environment are read from the rendered overlay and
resolved the way the kubelet does (tests/support/kube.py), then run with the venv's `mlflow` (the
version the CPU image installs, constraints.txt). Only what cannot exist on this machine is
replaced, each with its reason at the place it is replaced.
"""

from __future__ import annotations

import contextlib
import copy
import http.client
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from support.kube import container_argv, container_env, find, kustomize
from support.servers import free_port

OVERLAY = "manifests/overlays/example"
VENV_BIN = str(Path(sys.executable).parent)


@pytest.fixture(scope="module")
def rendered():
    docs = kustomize(OVERLAY)
    deployment = find(docs, "Deployment", "mlflow")
    pod = deployment["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "mlflow")
    return docs, deployment, pod, container


def namespace_of(deployment: dict) -> str:
    return deployment["metadata"]["namespace"]


def service_hosts(docs: list[dict], namespace: str, domain: str = "cluster.local") -> list[str]:
    """Every Host header a pod sends for the Service: its DNS names, with and without port."""
    svc = find(docs, "Service", "mlflow")
    port = svc["spec"]["ports"][0]["port"]
    name = svc["metadata"]["name"]
    names = [name, f"{name}.{namespace}", f"{name}.{namespace}.svc"]
    names.append(f"{name}.{namespace}.svc.{domain}")
    return [h for n in names for h in (n, f"{n}:{port}")]


def resolved_env(docs, deployment, pod, container) -> dict[str, str]:
    return container_env(docs, pod, container, namespace_of(deployment))


def request(port: int, method: str, path: str, host: str, body: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Host": host, "Content-Type": "application/json"}
    conn.request(method, path, body=json.dumps(body) if body else None, headers=headers)
    resp = conn.getresponse()
    return resp.status, resp.read().decode(errors="replace")


def probe(port: int, spec: dict) -> int:
    """An httpGet probe as the kubelet sends it (pkg/probe/http/request.go): GET the path, the
    probe's httpHeaders set (a Host header replaces the default pod-IP one)."""
    get = spec["httpGet"]
    headers = {h["name"]: h["value"] for h in get.get("httpHeaders", [])}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=spec.get("timeoutSeconds", 1))
    conn.request("GET", get["path"], headers={"Host": f"127.0.0.1:{port}", **headers})
    return conn.getresponse().status


@contextlib.contextmanager
def run_container(argv: list[str], env: dict[str, str], port: int, log: Path):
    """Run the container's argv with exactly its environment (plus PATH to the venv, where the
    image has `python` and `mlflow`); stop its process group afterwards."""
    with open(log, "w") as out:
        proc = subprocess.Popen(
            argv,
            env={**env, "PATH": f"{VENV_BIN}:/usr/bin:/bin"},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow exited {proc.returncode}:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(OSError):
                if request(port, "GET", "/health", "localhost")[0] == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow not up after 180 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)


def test_allowed_hosts_cover_every_service_name_and_nothing_foreign(rendered, monkeypatch):
    """mlflow's own matcher (mlflow/server/security_utils.py) on the resolved env var."""
    from mlflow.server.security_utils import get_allowed_hosts_from_env, is_allowed_host_header

    docs, deployment, pod, container = rendered
    env = resolved_env(docs, deployment, pod, container)
    monkeypatch.setenv("MLFLOW_SERVER_ALLOWED_HOSTS", env.get("MLFLOW_SERVER_ALLOWED_HOSTS", ""))
    allowed = get_allowed_hosts_from_env()
    assert allowed, "MLFLOW_SERVER_ALLOWED_HOSTS is not set: mlflow falls back to localhost"
    for host in service_hosts(docs, namespace_of(deployment)):
        assert is_allowed_host_header(allowed, host), host
    for host in ("evil.example.com", "mlflow.other-team.svc.cluster.local:5000", "10.0.0.7:5000"):
        assert not is_allowed_host_header(allowed, host), host


def test_an_overlay_sets_the_cluster_domain_once(tmp_path, monkeypatch):
    """A cluster on another DNS domain changes one env value; every name follows it."""
    from mlflow.server.security_utils import get_allowed_hosts_from_env, is_allowed_host_header
    from support.kube import ROOT

    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        # kustomize takes no absolute path to a kustomization: the overlay, relative to here.
        f"resources:\n  - {os.path.relpath(ROOT / OVERLAY, tmp_path)}\n"
        "patches:\n  - patch: |-\n"
        "      apiVersion: apps/v1\n      kind: Deployment\n      metadata: {name: mlflow}\n"
        "      spec: {template: {spec: {containers: [{name: mlflow, env: "
        "[{name: CLUSTER_DOMAIN, value: corp.internal}]}]}}}\n"
    )
    docs = kustomize(str(tmp_path))
    deployment = find(docs, "Deployment", "mlflow")
    pod = deployment["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "mlflow")
    env = resolved_env(docs, deployment, pod, container)
    monkeypatch.setenv("MLFLOW_SERVER_ALLOWED_HOSTS", env["MLFLOW_SERVER_ALLOWED_HOSTS"])
    allowed = get_allowed_hosts_from_env()
    for host in service_hosts(docs, namespace_of(deployment), "corp.internal"):
        assert is_allowed_host_header(allowed, host), host
    ns = namespace_of(deployment)
    assert not is_allowed_host_header(allowed, f"mlflow.{ns}.svc.cluster.local:5000")


def test_readiness_probe_goes_through_host_validation(rendered):
    """/health answers 200 whatever the Host (exempt from validation): a probe on it passes on
    a server that refuses every pod. The readiness probe must call the API with the Host
    pipeline pods send (the ConfigMap's MLFLOW_TRACKING_URI)."""
    from mlflow.server.security_utils import is_health_endpoint

    docs, deployment, pod, container = rendered
    get = container["readinessProbe"]["httpGet"]
    assert not is_health_endpoint(urlsplit(get["path"]).path), get["path"]
    headers = {h["name"]: h["value"] for h in get.get("httpHeaders", [])}
    tracking = find(docs, "ConfigMap", "qlora-kfp-config")["data"]["MLFLOW_TRACKING_URI"]
    assert headers.get("Host") == urlsplit(tracking).netloc


def test_artifact_destination_comes_from_the_overlay(rendered):
    docs, deployment, pod, container = rendered
    env = resolved_env(docs, deployment, pod, container)
    uri = find(docs, "ConfigMap", "qlora-kfp-config")["data"]["QLORA_KFP_ARTIFACT_URI"]
    assert env["MLFLOW_ARTIFACTS_DESTINATION"] == f"{uri}/mlflow"
    base = find(kustomize("manifests/base"), "Deployment", "mlflow")
    assert "s3://" not in json.dumps(base), "a bucket is hard-coded in the base Deployment"


@pytest.mark.integration
@pytest.mark.slow
def test_rendered_server_answers_pods_and_refuses_foreign_hosts(rendered, tmp_path):
    docs, deployment, pod, container = rendered
    env = resolved_env(docs, deployment, pod, container)
    argv = container_argv(container, env)
    # The PostgreSQL Service (mlflow-db) cannot exist here: the one value replaced is the
    # backend URI, which the container takes from the environment when it is set.
    env["MLFLOW_BACKEND_STORE_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # Where it listens: port 5000 of this machine may be taken, and a test binds loopback
    # only. Clients still send the Service's port (5000) in their Host header.
    port = free_port()
    env.update(MLFLOW_HOST="127.0.0.1", MLFLOW_PORT=str(port))
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"

    with run_container(argv, env, port, tmp_path / "mlflow.log"):
        for i, host in enumerate(service_hosts(docs, namespace_of(deployment))):
            status, body = request(
                port, "POST", "/api/2.0/mlflow/experiments/create", host, {"name": f"e{i}"}
            )
            assert status == 200, (host, status, body)
            status, body = request(
                port, "GET", f"/api/2.0/mlflow/experiments/get-by-name?experiment_name=e{i}", host
            )
            assert status == 200 and json.loads(body)["experiment"]["name"] == f"e{i}", host
        for host in ("evil.example.com", "mlflow.other-team.svc.cluster.local:5000"):
            status, body = request(port, "GET", "/api/2.0/mlflow/experiments/search", host)
            assert status == 403 and "Invalid Host header" in body, (host, status)
        assert probe(port, container["readinessProbe"]) == 200
        assert probe(port, container["livenessProbe"]) == 200

    # The same server without the allowed hosts (what the Deployment had before): the
    # readiness probe must fail, or it would pass on a server no pod can use.
    del env["MLFLOW_SERVER_ALLOWED_HOSTS"]
    with run_container(argv, env, port, tmp_path / "mlflow-default-hosts.log"):
        assert probe(port, container["livenessProbe"]) == 200
        assert probe(port, container["readinessProbe"]) == 403


SHIM = """#!{python}
import json, os, sys
with open({out!r}, "w") as f:
    json.dump({{"argv": sys.argv[1:], "env": os.environ.get("MLFLOW_BACKEND_STORE_URI")}}, f)
"""


@pytest.mark.parametrize(
    "password",
    ["p@ssword", "user:pass", "a/b/c", "100%sure", "%40", 'it\'s "$(HOME)" $x;', "p@:/%?#&="],
    ids=["at", "colon", "slash", "percent", "percent-escape", "quotes-dollar", "all"],
)
def test_database_password_reaches_postgres_intact(rendered, tmp_path, password):
    """The rendered command builds the backend URI from the mlflow-db Secret; SQLAlchemy (what
    MLflow's SqlAlchemyStore connects with) must read back exactly the Secret's password."""
    from sqlalchemy.dialects.postgresql.psycopg2 import PGDialect_psycopg2
    from sqlalchemy.engine import make_url

    docs, deployment, pod, container = copy.deepcopy(rendered)
    secret = find(docs, "Secret", "mlflow-db")
    secret["stringData"]["POSTGRES_PASSWORD"] = password  # what the user puts in the Secret
    env = resolved_env(docs, deployment, pod, container)
    argv = container_argv(container, env)
    # Stands in for the `mlflow` executable: records the URI `mlflow server` would be given
    # (--backend-store-uri, else its envvar MLFLOW_BACKEND_STORE_URI, as click reads them).
    shim_dir = tmp_path / "bin"
    shim_dir.mkdir()
    record = tmp_path / "mlflow-call.json"
    (shim_dir / "mlflow").write_text(SHIM.format(python=sys.executable, out=str(record)))
    (shim_dir / "mlflow").chmod(0o755)
    proc = subprocess.run(
        argv,
        env={**env, "PATH": f"{shim_dir}:{VENV_BIN}:/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and record.exists(), proc.stderr[-2000:]
    call = json.loads(record.read_text())
    args = call["argv"]
    uri = args[args.index("--backend-store-uri") + 1] if "--backend-store-uri" in args else None
    url = make_url(uri or call["env"])
    connect = PGDialect_psycopg2().create_connect_args(url)[1]
    data = secret["stringData"]
    assert connect == {
        "host": "mlflow-db",
        "port": 5432,
        "user": data["POSTGRES_USER"],
        "password": password,
        "dbname": data["POSTGRES_DB"],
    }
