"""A real Kubernetes control plane on 127.0.0.1: etcd, kube-apiserver and kube-controller-manager
v1.34.4.

The binaries are built from Go modules by ``make backend`` (backend/kube) into
``.cache/backend/bin``. The API server runs as a cluster's does, minus the nodes: TLS with a
serving certificate made here, static tokens for an admin (``system:masters``) and a Kubeflow
profile owner, service-account tokens signed by a key made here, ``Node,RBAC`` authorization
and the admission plugins a cluster enables by default (NamespaceLifecycle, LimitRanger,
ServiceAccount, ResourceQuota, PodSecurity, ...) plus NodeRestriction. The controller manager
runs the controllers whose work the API server's answers depend on: each namespace's
``default`` service account, quota usage (ResourceQuota admission refuses every pod until a
quota's status is counted), the aggregated ClusterRoles (``admin``, ``edit``, ``view``) and the
garbage collector (an object whose owner is deleted goes with it: a TrainJob's JobSet,
tests/support/trainer_backend.py).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import requests

from support.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("QLORA_KFP_KUBE_BIN", ROOT / ".cache/backend/bin"))
# The Kubeflow user a profile belongs to (its owner); a plain authenticated user here.
OWNER = "user@example.com"


@dataclass(frozen=True)
class Cluster:
    """Where the server listens, the CA its certificate chains to, and the static tokens."""

    url: str
    ca: Path
    admin_token: str  # user "admin" in group system:masters (cluster-admin)
    owner_token: str  # user OWNER, in no group but system:authenticated


def _write_key_and_cert(work: Path) -> None:
    """An RSA key and a self-signed serving certificate for 127.0.0.1 (also the CA the clients
    trust), and a second RSA key that signs service-account tokens."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    def key_pem(key) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    (work / "serving.key").write_bytes(key_pem(key))
    (work / "serving.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (work / "sa.key").write_bytes(key_pem(sa_key))


def _binary(name: str) -> str:
    path = BIN / name
    if not os.access(path, os.X_OK):
        # A failure, never a skip: CI must not pass without the real server.
        raise FileNotFoundError(f"{path} is missing: run `make backend` (needs Go)")
    return str(path)


@contextlib.contextmanager
def _process(cmd: list[str], log: Path, env: dict | None = None) -> Iterator[subprocess.Popen]:
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=None if env is None else {**os.environ, **env},
        )
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait(url: str, proc: subprocess.Popen, log: Path, timeout_s: float, **kwargs) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited ({proc.returncode}):\n{log.read_text()}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(url, timeout=2, **kwargs).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout_s}s:\n{log.read_text()[-4000:]}")


@contextlib.contextmanager
def etcd(work: Path) -> Iterator[str]:
    """A one-member etcd; yields its client URL."""
    client, peer = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    cmd = [
        _binary("etcd"),
        "--name=test",
        f"--data-dir={work / 'etcd'}",
        f"--listen-client-urls={client}",
        f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=test={peer}",
        # A throwaway store: no fsync saves seconds of the 2 cores' disk waits.
        "--unsafe-no-fsync",
        "--log-level=warn",
    ]
    with _process(cmd, work / "etcd.log") as proc:
        _wait(f"{client}/health", proc, work / "etcd.log", 30)
        yield client


# The controllers the tests need; the others (nodes, pods, volumes, ...) have nothing to do.
CONTROLLERS = "serviceaccount,resourcequota,clusterrole-aggregation,garbagecollector"


def write_kubeconfig(path: Path, url: str, ca: Path, token: str, namespace: str = "") -> Path:
    """Writes a kubeconfig that reaches the server at ``url`` (trusting ``ca``) with a token,
    its context in ``namespace`` when one is given.

    Returns:
        ``path``.
    """
    context = f", namespace: '{namespace}'" if namespace else ""
    path.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        f"clusters: [{{name: c, cluster: {{server: '{url}', certificate-authority: '{ca}'}}}}]\n"
        f"users: [{{name: u, user: {{token: '{token}'}}}}]\n"
        f"contexts: [{{name: c, context: {{cluster: c, user: u{context}}}}}]\n"
    )
    return path


@contextlib.contextmanager
def controller_manager(work: Path, url: str, token: str) -> Iterator[None]:
    """kube-controller-manager with CONTROLLERS, until ``edit`` holds the rules it aggregates.
    It acts with ``token`` (the admin's; a cluster gives it system:kube-controller-manager,
    whose rights the admin's include)."""
    kubeconfig = write_kubeconfig(
        work / "controller-manager.kubeconfig", url, work / "serving.crt", token
    )
    cmd = [
        _binary("kube-controller-manager"),
        f"--kubeconfig={kubeconfig}",
        f"--controllers={CONTROLLERS}",
        "--leader-elect=false",
        "--secure-port=0",  # nothing to serve: readiness is the controllers' work, below
    ]
    log = work / "kube-controller-manager.log"
    with _process(cmd, log) as proc:
        edit = f"{url}/apis/rbac.authorization.k8s.io/v1/clusterroles/edit"
        deadline = time.monotonic() + 60
        while True:
            auth = {"Authorization": f"Bearer {token}"}
            resp = requests.get(edit, headers=auth, verify=work / "serving.crt", timeout=5)
            if resp.ok and resp.json().get("rules"):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"no aggregated `edit` role:\n{log.read_text()[-4000:]}")
            time.sleep(0.2)
        yield


@contextlib.contextmanager
def kube_apiserver(
    work: Path, before_controllers: Callable[[Cluster], None] | None = None
) -> Iterator[Cluster]:
    """etcd, kube-apiserver and kube-controller-manager, ready to serve, stopped on exit.

    Args:
        work: The folder of the certificates, tokens, etcd's data and the logs.
        before_controllers: Called with the Cluster once the API server is ready and before the
            controller manager starts: CRDs installed here are watched by the garbage collector
            from its start, not from its next discovery (every 30 s).
    """
    work.mkdir(parents=True, exist_ok=True)
    _write_key_and_cert(work)
    admin, owner = secrets.token_hex(16), secrets.token_hex(16)
    (work / "tokens.csv").write_text(
        f'{admin},admin,uid-admin,"system:masters"\n{owner},{OWNER},uid-owner\n'
    )
    port = free_port()
    with etcd(work) as etcd_url:
        cmd = [
            _binary("kube-apiserver"),
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={port}",
            f"--cert-dir={work}",
            f"--tls-cert-file={work / 'serving.crt'}",
            f"--tls-private-key-file={work / 'serving.key'}",
            f"--token-auth-file={work / 'tokens.csv'}",
            f"--service-account-key-file={work / 'sa.key'}",
            f"--service-account-signing-key-file={work / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            "--service-cluster-ip-range=10.96.0.0/16",
            "--authorization-mode=Node,RBAC",
            # Added to the defaults, which hold NamespaceLifecycle, LimitRanger, ServiceAccount,
            # ResourceQuota, PodSecurity, the admission webhooks and policies.
            "--enable-admission-plugins=NodeRestriction",
            "--profiling=false",
        ]
        log = work / "kube-apiserver.log"
        with _process(cmd, log) as proc:
            url = f"https://127.0.0.1:{port}"
            auth = {"Authorization": f"Bearer {admin}"}
            _wait(f"{url}/readyz", proc, log, 90, headers=auth, verify=work / "serving.crt")
            cluster = Cluster(url, work / "serving.crt", admin, owner)
            if before_controllers is not None:
                before_controllers(cluster)
            with controller_manager(work, url, admin):
                yield cluster
