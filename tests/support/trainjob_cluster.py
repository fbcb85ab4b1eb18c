"""A profile namespace for train_runner=trainjob on the real API server (tests/support/kube_apiserver.py),
and a stand-in for what cannot run here: the Trainer's controller and the kubelet.

* :func:`profile_namespace`: the TrainJob CRD of the Kubeflow Trainer release
  backend/trainer/go.mod pins (v2.0.0; ``make backend-trainer`` copies it from the Go module)
  and the example-trainjob overlay, applied to a namespace.
* :func:`runner_kubeconfig`: the API as the train task's pod has it, the qlora-kfp-runner
  service account's token (its Role: manifests/components/trainjob).
* :class:`LocalTrainer`: runs a TrainJob as the Trainer and the kubelet would, with local
  processes: ``numNodes`` of its ``spec.trainer.command``, each with the torch plugin's
  ``PET_*`` variables (Trainer pkg/runtime/framework/plugins/torch/torch.go; the rendezvous on
  127.0.0.1 instead of node 0's pod), the TrainJob's ``value`` variables and the S3
  endpoint and keys in place of the Secret references; then sets ``Complete``, or ``Failed``
  with JobSet's reason and message, on its status as the Trainer does.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from qlora_kfp.training.trainjob_spec import GROUP, PLURAL, TRAINJOB, VERSION, JobKind
from support.kube import kustomize_into
from support.kube_api import Kube
from support.kube_apiserver import write_kubeconfig
from support.servers import free_port
from support.trainer_backend import MANIFESTS, pinned_version

SA = "qlora-kfp-runner"


def trainer_crds(*plurals: str) -> list[dict]:
    """The Trainer release's own CRDs (its manifests/base/crds), as `make backend-trainer`
    copies them from the Go module of the release backend/trainer/go.mod pins."""
    stamp = MANIFESTS / "VERSION"
    if not stamp.is_file() or stamp.read_text().strip() != pinned_version():
        # A failure, never a skip, as for the binaries (tests/support/trainer_backend.py).
        raise FileNotFoundError(
            f"{MANIFESTS} is not {pinned_version()}: run `make backend-trainer`"
        )
    return [yaml.safe_load((MANIFESTS / f"crds/{GROUP}_{p}.yaml").read_text()) for p in plurals]


ROOT = Path(__file__).resolve().parents[2]


@functools.cache
def pytorchjob_crd() -> dict:
    """The PyTorchJob CRD of Training Operator v1.8.1 (its manifests/base/crds), which
    ``make backend-trainer`` copies from the release's Go module; missing, the test fails."""
    path = ROOT / ".cache/backend/training-operator/v1.8.1/kubeflow.org_pytorchjobs.yaml"
    assert path.is_file(), f"{path} is missing: run make backend-trainer (needs Go)"
    return yaml.safe_load(path.read_text())


def profile_namespace(kube: Kube, name: str, work: Path, crd: bool = True) -> str:
    """``name`` with the example-trainjob overlay applied, and the TrainJob CRD installed
    (``crd``; where the Trainer runs, its harness installed it)."""
    if crd:
        kube.apply_crds(trainer_crds(PLURAL))
    kube.namespace(name)
    assert kube.refused(kustomize_into("manifests/overlays/example-trainjob", name, work)) == {}
    kube.wait_quotas_counted(name)
    return name


def runner_kubeconfig(kube: Kube, namespace: str, path: Path) -> str:
    """A kubeconfig as the train task's pod has it: the runner's token, its namespace."""
    token = kube.service_account_token(namespace, SA)
    return str(write_kubeconfig(path, kube.url, kube.ca, token, namespace))


def set_condition(
    kube: Kube,
    namespace: str,
    name: str,
    kind: str,
    reason: str,
    message: str,
    job: JobKind = TRAINJOB,
):
    """What the Trainer's controller (or the Training Operator, for ``job``) writes: a
    condition on the status subresource."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    cond = {"type": kind, "status": "True", "reason": reason, "message": message}
    patch = {"status": {"conditions": [{**cond, "lastTransitionTime": now}]}}
    path = f"/apis/{job.group}/{job.version}/namespaces/{namespace}/{job.plural}/{name}/status"
    kube.ok("PATCH", path, patch, headers={"Content-Type": "application/merge-patch+json"})


class LocalTrainer(threading.Thread):
    """Runs the first TrainJob created in ``namespace`` as local node processes (see the
    module's docstring); ``outputs[rank]`` is each node's (stdout, stderr)."""

    def __init__(self, kube: Kube, namespace: str, node_env: dict[str, str], disks: Path):
        super().__init__(daemon=True, name="local-trainer")
        self.kube, self.namespace, self.node_env, self.disks = kube, namespace, node_env, disks
        self.outputs: list[tuple[str, str]] = []
        self.trainjob: dict = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # for the test to show: a thread's error is only printed
            self.error = exc
            if self.trainjob:  # the task's watch must not wait for ever
                name = self.trainjob["metadata"]["name"]
                set_condition(self.kube, self.namespace, name, "Failed", "LocalTrainer", str(exc))
            raise

    def _run(self) -> None:
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{self.namespace}/{PLURAL}"
        deadline = time.monotonic() + 300
        items: list[dict] = []
        while not items:
            assert time.monotonic() < deadline, "no TrainJob was created"
            resp = self.kube.request("GET", path)  # a new CRD's storage may answer 429 first
            items = resp.json()["items"] if resp.ok else []
            time.sleep(0.2)
        self.trainjob = job = items[0]
        trainer = job["spec"]["trainer"]
        values = {e["name"]: e["value"] for e in trainer.get("env", []) if "value" in e}
        port, nodes = free_port(), trainer["numNodes"]
        command = [sys.executable if trainer["command"][0] == "python" else trainer["command"][0]]
        procs = []
        for rank in range(nodes):
            pet = {
                "PET_NNODES": str(nodes),
                "PET_NPROC_PER_NODE": str(trainer["numProcPerNode"]),
                "PET_NODE_RANK": str(rank),
                "PET_MASTER_ADDR": "127.0.0.1",
                "PET_MASTER_PORT": str(port),
                "QLORA_KFP_CACHE": str(self.disks / f"node-{rank}"),  # each node its own disk
            }
            procs.append(
                subprocess.Popen(
                    command + trainer["command"][1:],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env={**os.environ, **values, **self.node_env, **pet},
                )
            )
        self.outputs = [p.communicate(timeout=900) for p in procs]
        name = job["metadata"]["name"]
        if all(p.returncode == 0 for p in procs):
            done = ("Complete", "AllJobsCompleted", "jobset completed successfully")
        else:
            done = ("Failed", "FailedJobs", "jobset failed due to one or more job failures")
        set_condition(self.kube, self.namespace, name, *done)


# The train task's process, reduced to its job: create it, watch it, end on SIGTERM
# (argv: the runner's kubeconfig, the job, the job kind's name in trainjob_spec).
WATCHING_TASK = """
import dataclasses, json, sys
from qlora_kfp.errors import QloraError
from qlora_kfp.training import trainjob_client, trainjob_spec, trainjob_watch
cluster = trainjob_client.connect(sys.argv[1])
cluster = dataclasses.replace(cluster, job=getattr(trainjob_spec, sys.argv[3]))
try:
    trainjob_watch.run(cluster, json.loads(sys.argv[2]))
except QloraError as exc:
    sys.exit(f"train failed: {exc}")
"""


def sigterm_while_watching(kube: Kube, runner_config: str, body: dict, job: JobKind) -> None:
    """Run the task on ``body``, SIGTERM it once it watches its job (as KFP stops a terminated
    run's pods): it exits 1 with one line and the job is deleted (foreground: gone, or marked
    for deletion where no garbage collector removes it)."""
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    path = f"/apis/{job.group}/{job.version}/namespaces/{namespace}/{job.plural}/{name}"
    kind = "TRAINJOB" if job == TRAINJOB else "PYTORCHJOB"
    proc = subprocess.Popen(
        [sys.executable, "-c", WATCHING_TASK, runner_config, json.dumps(body), kind],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not kube.request("GET", path).ok:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"the task never created its {job.kind}"
        time.sleep(0.1)
    time.sleep(2)  # the task is in its watch
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        f"train failed: {job.kind} {namespace}/{name}: deleted, the train task was stopped "
        "(SIGTERM: the run was terminated)"
    )
    resp = kube.request("GET", path)
    if resp.ok:
        got = resp.json()["metadata"]
        assert got["deletionTimestamp"] and got["finalizers"] == ["foregroundDeletion"]
    else:
        assert resp.status_code == 404
