"""Kubeflow Trainer's and JobSet's own controller managers against a real Kubernetes API server.

Real: the API server, etcd and kube-controller-manager of tests/support/kube_apiserver.py (a cluster of
their own, with the garbage collector), and two controller managers built by ``make
backend-trainer`` from the Go modules backend/trainer/go.mod pins, unchanged:

* the Trainer's ``trainer-controller-manager`` (``github.com/kubeflow/trainer/v2``
  ``cmd/trainer-controller-manager``): its TrainJob, TrainingRuntime and ClusterTrainingRuntime
  controllers and validating webhooks;
* JobSet's controller manager (``sigs.k8s.io/jobset``, the version the Trainer requires, its
  ``main.go``): the JobSet controller, which makes each replicated job's Jobs and the headless
  Service that gives the pods their DNS names, and JobSet's defaulting and validating webhooks.

The objects installed are the releases' own manifests (copied from the modules by the Make
target): the CRDs (the Trainer's ``manifests/base/crds``, JobSet's
``config/components/crd/bases``), the ServiceAccounts, ClusterRoles and bindings each manager
acts with (the Trainer's ``manifests/base/rbac``, JobSet's ``config/components/rbac``; each runs
with its service account's token, so a missing rule fails here as in a cluster), the webhook
configurations (the Trainer's ``manifests/base/webhook``, JobSet's ``config/components/webhook``),
all rendered by ``kubectl kustomize`` into ``kubeflow-system`` and ``jobset-system`` as the
Trainer's ``manifests/overlays/manager`` and JobSet's ``config/default`` render them, and the
``torch-distributed`` ClusterTrainingRuntime (``manifests/base/runtimes/torch_distributed.yaml``).

Not real, and why:

* No kubelet, scheduler, node or Job controller: no pod is created, let alone run. A JobSet's
  Jobs exist but never start, so neither the JobSet nor the TrainJob reaches a terminal
  condition (the Trainer copies Complete/Failed from the JobSet, ``TerminalCondition`` in
  ``pkg/runtime/framework/plugins/jobset/jobset.go``); a TrainJob has a ``Suspended``
  condition only when suspended.
* No Services in front of the managers: each webhook configuration's ``clientConfig.service``
  becomes ``clientConfig.url`` (``https://127.0.0.1:<port>/<the same path>``), and JobSet's
  ``webhook-service`` is not installed.
* What the kubelet does for the managers' pods is done here:

  - JobSet takes its webhook's address, certificate folder and ``internalCertManagement:
    {enable: false}`` from its configuration file (``api/config/v1alpha1``): the certificate
    made here is its own, no rotator runs.
  - The Trainer has no such settings. Its certificate rotator (``pkg/util/cert/cert.go``,
    ``github.com/open-policy-agent/cert-controller``'s ``pkg/rotator/rotator.go``) keeps the
    Secret ``kubeflow-trainer-webhook-cert`` and injects its CA into the webhook
    configuration, but leaves the files to the pod's Secret volume mounted at
    ``/tmp/k8s-webhook-server/serving-certs``. This fixture makes the CA and a serving
    certificate the rotator accepts as they are (the CA named ``kubeflow-trainer-ca``, the
    serving certificate for ``kubeflow-trainer-controller-manager.kubeflow-system.svc``, both
    valid beyond its 90-day look-ahead), plus the IP 127.0.0.1 the API server calls, puts
    them in that Secret and writes them as the volume would. Its webhook server reads them
    from ``$TMPDIR/k8s-webhook-server/serving-certs`` (controller-runtime's default
    ``CertDir``), so ``TMPDIR`` points at this fixture's folder; the rotator only checks that
    ``/tmp/k8s-webhook-server/serving-certs/tls.crt`` exists (a fixed path), so one is written
    there when missing and never overwritten. Its webhook server listens on every address
    (the release has no flag for the host).

* Each manager's namespace is the default it takes when no service-account namespace file is
  mounted (``getOperatorNamespace``): ``kubeflow-system``, ``jobset-system``. Their tokens are
  TokenRequest's (one hour): a test session must end within it.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import datetime
import ipaddress
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from support.kube import kustomize
from support.kube_api import Kube
from support.kube_apiserver import BIN, Cluster, _process, _wait, kube_apiserver, write_kubeconfig
from support.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = Path(os.environ.get("QLORA_KFP_TRAINER_MANIFESTS", ROOT / ".cache/backend/trainer"))
MODULE = "github.com/kubeflow/trainer/v2"
JOBSET_MODULE = "sigs.k8s.io/jobset"

# What the Trainer release hard-codes (cmd/trainer-controller-manager/main.go,
# pkg/util/cert/cert.go) and its manifests name.
SYSTEM_NAMESPACE = "kubeflow-system"
MANAGER = "kubeflow-trainer-controller-manager"  # its ServiceAccount, ClusterRole and Service
WEBHOOK_SECRET = "kubeflow-trainer-webhook-cert"
WEBHOOK_CONFIGURATION = "validator.trainer.kubeflow.org"
CA_NAME = "kubeflow-trainer-ca"
MOUNTED_CERT_DIR = Path("/tmp/k8s-webhook-server/serving-certs")
RUNTIME = "torch-distributed"
# JobSet's, as config/default names them (namespace, namePrefix "jobset-").
JOBSET_NAMESPACE = "jobset-system"
JOBSET_MANAGER = "jobset-controller-manager"
JOBSET_SERVICE = "jobset-webhook-service"

RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
WEBHOOK_KINDS = ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration")


@dataclass(frozen=True)
class TrainerBackend:
    """The cluster the Trainer runs against, and where its managers log.

    Attributes:
        cluster: The API server: ``url``, ``ca`` (its CA file), ``admin_token``
            (system:masters) and ``owner_token``.
        version: The Kubeflow Trainer release running (backend/trainer/go.mod).
        jobset_version: The JobSet release running.
        runtime: The ClusterTrainingRuntime installed (``torch-distributed``).
        webhook_url: Where the API server calls the Trainer's webhooks.
        log: The Trainer's controller manager's log file.
        jobset_log: JobSet's controller manager's log file.
    """

    cluster: Cluster
    version: str
    jobset_version: str
    runtime: str
    webhook_url: str
    log: Path
    jobset_log: Path

    @property
    def url(self) -> str:
        """The API server's URL (``https://127.0.0.1:<port>``)."""
        return self.cluster.url

    @property
    def ca(self) -> Path:
        """The file of the CA the API server's certificate chains to."""
        return self.cluster.ca

    @property
    def admin_token(self) -> str:
        """A bearer token of a member of system:masters."""
        return self.cluster.admin_token

    def kube(self) -> Kube:
        """Returns a client of the API server as cluster-admin (tests/support/kube_api.py)."""
        return Kube(self.url, self.ca, self.admin_token)

    def namespace(self, name: str) -> str:
        """Creates a namespace and waits for its ``default`` service account.

        Args:
            name: The namespace's name.

        Returns:
            The name.
        """
        self.kube().namespace(name)
        return name

    def logs(self, chars: int = 6000) -> str:
        """Returns the end of each manager's log, for a failure's report."""
        return "\n".join(
            f"--- {path.name} (end) ---\n{path.read_text()[-chars:]}"
            for path in (self.log, self.jobset_log)
        )


def pinned_version(module: str = MODULE) -> str:
    """Returns the version of ``module`` backend/trainer/go.mod requires (``v2.0.0``)."""
    go_mod = (ROOT / "backend/trainer/go.mod").read_text()
    return re.search(rf"^\s*(?:require\s+)?{re.escape(module)} (v\S+)$", go_mod, re.M)[1]


def _checked_release() -> tuple[Path, Path]:
    """Returns the Trainer's and JobSet's manager binaries.

    Raises:
        FileNotFoundError: A binary or the copied manifests are missing.
        RuntimeError: One is of another release than go.mod's (Go's build information in a
            binary names its main package's module and version).
    """
    binaries = [BIN / "trainer-controller-manager", BIN / "jobset-controller-manager"]
    stamp = MANIFESTS / "VERSION"
    if not all(os.access(b, os.X_OK) for b in binaries) or not stamp.is_file():
        # A failure, never a skip: CI must not pass without the real managers.
        raise FileNotFoundError(f"{binaries} or {stamp} is missing: run `make backend-trainer`")
    for binary, module in zip(binaries, (MODULE, JOBSET_MODULE), strict=True):
        version = pinned_version(module)
        if f"\t{module}\t{version}\t".encode() not in binary.read_bytes():
            raise RuntimeError(f"{binary} is not {module} {version}: run `make backend-trainer`")
    if stamp.read_text().strip() != pinned_version():
        raise RuntimeError(
            f"{MANIFESTS} is not {MODULE} {pinned_version()}: run `make backend-trainer`"
        )
    return binaries[0], binaries[1]


def _pem(cert=None, key=None) -> bytes:
    from cryptography.hazmat.primitives import serialization

    if cert is not None:
        return cert.public_bytes(serialization.Encoding.PEM)
    # PKCS#1, what the rotator parses (x509.ParsePKCS1PrivateKey in buildArtifactsFromSecret).
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def webhook_certificates(ca_name: str, dns_name: str) -> dict[str, bytes]:
    """Makes a CA and a webhook server's certificate, as cert-controller's rotator makes them.

    Args:
        ca_name: The CA's common name (and DNS name, which the rotator checks).
        dns_name: The Service's DNS name (``<service>.<namespace>.svc``) the serving
            certificate is for, with 127.0.0.1 (where the API server calls it here).

    Returns:
        PEM by the key of the rotator's Secret: ``ca.crt``/``ca.key`` (as ``CreateCACert``
        makes them) and ``tls.crt``/``tls.key`` (as ``CreateCertPEM`` does). Both outlive the
        rotator's 90-day look-ahead, so it keeps them.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    begin, year = now - datetime.timedelta(hours=1), datetime.timedelta(days=365)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, ca_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ca_name.removesuffix("-ca")),
        ]
    )
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_subject)
        .issuer_name(ca_subject)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(begin)
        .not_valid_after(now + 10 * year)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(ca_name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_encipherment=True,
                key_cert_sign=True,
                content_commitment=False,
                data_encipherment=False,
                key_agreement=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_name)]))
        .issuer_name(ca_subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(begin)
        .not_valid_after(now + year)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(dns_name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return {
        "ca.crt": _pem(cert=ca),
        "ca.key": _pem(key=ca_key),
        "tls.crt": _pem(cert=cert),
        "tls.key": _pem(key=key),
    }


def release_manifests(
    work: Path, namespace: str, parts: list[str], name_prefix: str = ""
) -> list[dict]:
    """Renders folders of MANIFESTS into a namespace, as the release's own overlay does.

    Args:
        work: A folder for the overlay (made).
        namespace: The namespace of the objects (and of the service accounts bound).
        parts: Folders of MANIFESTS (kustomizations) to render.
        name_prefix: A prefix of every name (JobSet's ``config/default`` has ``jobset-``).

    Returns:
        The objects, as ``kubectl kustomize`` writes them.
    """
    work.mkdir()
    resources = "".join(f"  - {os.path.relpath(MANIFESTS / p, work)}\n" for p in parts)
    (work / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"namespace: {namespace}\nnamePrefix: '{name_prefix}'\nresources:\n{resources}"
    )
    return kustomize(str(work))


def _load(path: Path) -> list[dict]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's: 10 times faster
    return [d for d in yaml.load_all(path.read_text(), Loader=loader) if d]


def served_at(configuration: dict, url: str, ca: bytes) -> dict:
    """Points a webhook configuration at a URL instead of its Service.

    Args:
        configuration: A Validating- or MutatingWebhookConfiguration whose webhooks name a
            Service.
        url: The server's URL; each webhook keeps its path.
        ca: The PEM of the CA the server's certificate chains to.

    Returns:
        A copy calling ``url`` + each webhook's path, trusting ``ca``.
    """
    configuration = copy.deepcopy(configuration)
    for hook in configuration["webhooks"]:
        path = hook["clientConfig"]["service"]["path"]
        hook["clientConfig"] = {"url": url + path, "caBundle": base64.b64encode(ca).decode()}
    return configuration


def train_job(name: str, namespace: str, runtime: str = RUNTIME, **trainer) -> dict:
    """Returns a TrainJob.

    Args:
        name: Its name.
        namespace: Its namespace.
        runtime: The ClusterTrainingRuntime it references.
        **trainer: Its ``spec.trainer`` (image, command, numNodes, resourcesPerNode, ...).
    """
    spec: dict = {"runtimeRef": {"name": runtime}}
    if trainer:
        spec["trainer"] = trainer
    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "TrainJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def _until_admitted(
    kube: Kube, doc: dict, proc: subprocess.Popen, log: Path, dry_run: bool = False
) -> None:
    """Applies ``doc`` until the API server admits it (30 s at most).

    A manager registers its webhook handlers as /readyz starts to answer, and its cache sees a
    new runtime a moment after it is stored: until then its webhooks refuse.
    """
    deadline = time.monotonic() + 30
    while True:
        resp = kube.apply(doc, dry_run=dry_run)
        if resp.ok:
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(
                f"{doc['kind']}/{doc['metadata']['name']} refused: {resp.text[:1000]}\n"
                f"{log.read_text()[-4000:]}"
            )
        time.sleep(0.2)


def _installed(admin: Kube, docs: list[dict]) -> None:
    refused = admin.refused(docs)
    assert refused == {}, refused


@contextlib.contextmanager
def _jobset_manager(
    admin: Kube, cluster: Cluster, binary: Path, work: Path
) -> Iterator[subprocess.Popen]:
    """JobSet's controller manager, its RBAC and webhooks installed, until it admits a JobSet."""
    docs = release_manifests(
        work / "jobset-overlay", JOBSET_NAMESPACE, ["jobset/rbac", "jobset/webhook"], "jobset-"
    )
    webhooks = [d for d in docs if d["kind"] in WEBHOOK_KINDS]
    rbac = [d for d in docs if d["kind"] in RBAC_KINDS]
    # The rest: the webhook Service, with no pod behind it here.
    assert [d["kind"] for d in docs if d not in webhooks + rbac] == ["Service"]
    admin.namespace(JOBSET_NAMESPACE)
    _installed(admin, rbac)
    certs = webhook_certificates("jobset-ca", f"{JOBSET_SERVICE}.{JOBSET_NAMESPACE}.svc")
    cert_dir = work / "jobset-certs"
    cert_dir.mkdir()
    for name in ("tls.crt", "tls.key"):
        (cert_dir / name).write_bytes(certs[name])
    port, probe = free_port(), free_port()
    _installed(
        admin, [served_at(d, f"https://127.0.0.1:{port}", certs["ca.crt"]) for d in webhooks]
    )
    config = work / "jobset-config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "config.jobset.x-k8s.io/v1alpha1",
                "kind": "Configuration",
                "leaderElection": {"leaderElect": False},
                "health": {"healthProbeBindAddress": f"127.0.0.1:{probe}"},
                "metrics": {"bindAddress": "0"},
                "webhook": {"host": "127.0.0.1", "port": port, "certDir": str(cert_dir)},
                "internalCertManagement": {"enable": False},
            }
        )
    )
    token = admin.service_account_token(JOBSET_NAMESPACE, JOBSET_MANAGER)
    kubeconfig = write_kubeconfig(work / "jobset.kubeconfig", cluster.url, cluster.ca, token)
    cmd = [str(binary), f"--kubeconfig={kubeconfig}", f"--config={config}"]
    log = work / "jobset-controller-manager.log"
    with _process(cmd, log) as proc:
        _wait(f"http://127.0.0.1:{probe}/readyz", proc, log, 60)
        pod = {"containers": [{"name": "c", "image": "x"}], "restartPolicy": "Never"}
        probe_job = {"name": "probe", "template": {"spec": {"template": {"spec": pod}}}}
        job_set = {
            "apiVersion": "jobset.x-k8s.io/v1alpha2",
            "kind": "JobSet",
            "metadata": {"name": "probe", "namespace": "default"},
            "spec": {"replicatedJobs": [probe_job]},
        }
        _until_admitted(admin, job_set, proc, log, dry_run=True)
        yield proc


@contextlib.contextmanager
def _trainer_manager(
    admin: Kube, cluster: Cluster, binary: Path, work: Path, docs: list[dict]
) -> Iterator[tuple[str, Path]]:
    """The Trainer's controller manager, its RBAC, webhooks and runtime installed, until it
    admits a TrainJob of the runtime; yields its webhook URL and its log."""
    (configuration,) = [d for d in docs if d["kind"] == "ValidatingWebhookConfiguration"]
    assert configuration["metadata"]["name"] == WEBHOOK_CONFIGURATION
    admin.namespace(SYSTEM_NAMESPACE)
    _installed(admin, [d for d in docs if d["kind"] in RBAC_KINDS])
    certs = webhook_certificates(CA_NAME, f"{MANAGER}.{SYSTEM_NAMESPACE}.svc")
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": WEBHOOK_SECRET, "namespace": SYSTEM_NAMESPACE},
        "data": {k: base64.b64encode(v).decode() for k, v in certs.items()},
    }
    port, probe = free_port(), free_port()
    webhook_url = f"https://127.0.0.1:{port}"
    _installed(admin, [secret, served_at(configuration, webhook_url, certs["ca.crt"])])
    # The Secret volume, as the kubelet would mount it (see the module docstring).
    tmpdir = work / "tmp"
    mounted = tmpdir / "k8s-webhook-server/serving-certs"
    mounted.mkdir(parents=True)
    for name in ("tls.crt", "tls.key"):
        (mounted / name).write_bytes(certs[name])
    MOUNTED_CERT_DIR.mkdir(parents=True, exist_ok=True)
    if not (MOUNTED_CERT_DIR / "tls.crt").exists():
        (MOUNTED_CERT_DIR / "tls.crt").write_bytes(certs["tls.crt"])
    token = admin.service_account_token(SYSTEM_NAMESPACE, MANAGER)
    kubeconfig = write_kubeconfig(work / "trainer.kubeconfig", cluster.url, cluster.ca, token)
    cmd = [
        str(binary),
        f"--kubeconfig={kubeconfig}",
        f"--webhook-server-port={port}",
        f"--health-probe-bind-address=127.0.0.1:{probe}",
        "--metrics-bind-address=0",
        "--leader-elect=false",
        "--zap-encoder=console",
    ]
    log = work / "trainer-controller-manager.log"
    with _process(cmd, log, env={"TMPDIR": str(tmpdir)}) as proc:
        # Ready once the rotator has injected the CA and the webhook server serves.
        _wait(f"http://127.0.0.1:{probe}/readyz", proc, log, 60)
        (runtime,) = _load(MANIFESTS / "runtimes/torch_distributed.yaml")
        assert runtime["metadata"]["name"] == RUNTIME
        _until_admitted(admin, runtime, proc, log)
        _until_admitted(admin, train_job("probe", "default"), proc, log, dry_run=True)
        yield webhook_url, log


@contextlib.contextmanager
def trainer_backend(work: Path) -> Iterator[TrainerBackend]:
    """Runs a cluster with JobSet and the Trainer installed and running, until exit.

    The cluster is tests/support/kube_apiserver.py's, with the Trainer's and JobSet's CRDs installed
    before its controller manager starts (so that the garbage collector watches them from its
    start). JobSet's manager starts first (the Trainer's JobSets go through its webhooks), then
    the Trainer's. Yields once a dry-run TrainJob of ``torch-distributed`` is admitted.

    Args:
        work: The folder of the certificates, kubeconfigs and logs (kept).

    Yields:
        The running backend.

    Raises:
        FileNotFoundError: ``make backend-trainer`` (or ``make backend``) has not run.
        RuntimeError: A server exited or refused what it must admit (its log's end included).
        TimeoutError: A server was not ready in time (its log's end included).
    """
    trainer_bin, jobset_bin = _checked_release()
    work.mkdir(parents=True, exist_ok=True)
    docs = release_manifests(work / "overlay", SYSTEM_NAMESPACE, ["crds", "rbac", "webhook"])
    crds = [d for d in docs if d["kind"] == "CustomResourceDefinition"]
    crds += _load(MANIFESTS / "jobset/crd/bases/jobset.x-k8s.io_jobsets.yaml")

    def install_crds(cluster: Cluster) -> None:
        Kube(cluster.url, cluster.ca, cluster.admin_token).apply_crds(crds)

    with kube_apiserver(work / "kube", before_controllers=install_crds) as cluster:
        admin = Kube(cluster.url, cluster.ca, cluster.admin_token)
        with (
            _jobset_manager(admin, cluster, jobset_bin, work),
            _trainer_manager(admin, cluster, trainer_bin, work, docs) as (webhook_url, log),
        ):
            yield TrainerBackend(
                cluster,
                pinned_version(),
                pinned_version(JOBSET_MODULE),
                RUNTIME,
                webhook_url,
                log,
                work / "jobset-controller-manager.log",
            )
