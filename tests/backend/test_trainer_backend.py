"""What Kubeflow Trainer's and JobSet's own controller managers and webhooks do with a TrainJob,
on a real API server (tests/support/trainer_backend.py): the JobSet, Jobs and Service it becomes, the
refusals, the garbage collection.

No kubelet runs, so no pod starts and a TrainJob reaches no Complete or Failed condition; what
is asserted is what the controllers write to the API server and what the Trainer's webhook,
JobSet's webhook and the CRDs' schemas refuse.
"""

from __future__ import annotations

import itertools
import re
import time

import pytest
from support import trainer_backend
from support.trainer_backend import train_job

pytestmark = pytest.mark.integration

JOBSETS = "/apis/jobset.x-k8s.io/v1alpha2/namespaces/{ns}/jobsets"
TRAINJOBS = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/{ns}/trainjobs"
IMAGE = "ghcr.io/qlora-kfp/qlora-kfp-gpu:0.1.0"
COMMAND = ["python", "-m", "qlora_kfp.tasks.train"]
_names = itertools.count()


@pytest.fixture
def ns(kubeflow_trainer):
    """A namespace of this test's own."""
    return kubeflow_trainer.namespace(f"team-{next(_names)}")


@pytest.fixture
def admin(kubeflow_trainer):
    """The Trainer's API server as cluster-admin."""
    return kubeflow_trainer.kube()


def wait_for(admin, path: str, done, what: str, timeout_s: float = 30) -> dict | None:
    """GET ``path`` until ``done(response)``; its JSON (None if not found)."""
    deadline = time.monotonic() + timeout_s
    while True:
        resp = admin.request("GET", path)
        if done(resp):
            return resp.json() if resp.ok else None
        if time.monotonic() > deadline:
            pytest.fail(f"{what} after {timeout_s}s: {resp.status_code} {resp.text[:500]}")
        time.sleep(0.1)


def created(admin, doc: dict) -> dict:
    resp = admin.create(doc)
    assert resp.ok, resp.text
    return resp.json()


def job_set_of(admin, job: dict) -> dict:
    meta = job["metadata"]
    path = JOBSETS.format(ns=meta["namespace"]) + f"/{meta['name']}"
    return wait_for(admin, path, lambda r: r.ok, f"no JobSet for TrainJob {meta['name']}")


def env_of(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


GPUS = {"nvidia.com/gpu": "2"}


# PET_NPROC_PER_NODE as the torch plugin computes it (calculateNumProcPerNode in
# pkg/runtime/framework/plugins/torch/torch.go): the limits are read first, then the requests,
# and a node that requests nothing gets 1, whatever numProcPerNode says. So a TrainJob for GPUs
# must request what it limits (a pod's requests default to its limits; a TrainJob's do not).
@pytest.mark.parametrize(
    ("resources", "nproc", "expected"),
    [
        ({"requests": GPUS, "limits": GPUS}, None, "auto"),  # torchrun counts the GPUs
        ({"requests": GPUS, "limits": GPUS}, 2, "2"),
        ({"requests": {"cpu": "3"}}, None, "3"),  # CPU only: a process per CPU
        ({"limits": GPUS, "requests": {"cpu": "4", "memory": "32Gi"}}, None, "4"),
        ({"limits": GPUS}, 2, "1"),
    ],
    ids=["gpus", "gpus-explicit", "cpus", "gpu-limits-cpu-requests", "limits-only"],
)
def test_a_train_job_becomes_a_job_set_of_its_runtime(admin, ns, resources, nproc, expected):
    trainer = {
        "image": IMAGE,
        "command": COMMAND,
        "args": ["--lora_r", "16"],
        "numNodes": 2,
        "resourcesPerNode": resources,
        "env": [{"name": "HF_HUB_OFFLINE", "value": "1"}],
    }
    if nproc is not None:
        trainer["numProcPerNode"] = nproc
    job = created(admin, train_job("qlora", ns, **trainer))
    job_set = job_set_of(admin, job)

    # Its controller: the garbage collector deletes it with the TrainJob.
    assert job_set["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "trainer.kubeflow.org/v1alpha1",
            "kind": "TrainJob",
            "name": "qlora",
            "uid": job["metadata"]["uid"],
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    (node,) = job_set["spec"]["replicatedJobs"]  # torch-distributed has one job: "node"
    assert (node["name"], node["replicas"]) == ("node", 1)
    assert node["template"]["spec"]["parallelism"] == node["template"]["spec"]["completions"] == 2
    (container,) = node["template"]["spec"]["template"]["spec"]["containers"]
    assert (container["name"], container["image"]) == ("node", IMAGE)
    assert (container["command"], container["args"]) == (COMMAND, ["--lora_r", "16"])
    assert container["resources"] == resources
    assert container["ports"] == [{"containerPort": 29500, "protocol": "TCP"}]
    assert env_of(container) == {
        "HF_HUB_OFFLINE": "1",
        "PET_NNODES": "2",
        "PET_NPROC_PER_NODE": expected,
        "PET_NODE_RANK": {
            "fieldRef": {
                "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"
            }
        },
        # The first pod of the JobSet's headless service (subdomain: the TrainJob's name).
        "PET_MASTER_ADDR": "qlora-node-0-0.qlora",
        "PET_MASTER_PORT": "29500",
    }
    # Nothing runs the JobSet: the TrainJob is neither complete nor failed.
    stored = admin.ok("GET", TRAINJOBS.format(ns=ns) + "/qlora")
    assert not (stored.get("status") or {}).get("conditions")


def test_the_job_set_becomes_indexed_jobs_and_a_headless_service(admin, ns):
    """JobSet's controller makes the Job of the replicated job (Indexed: a pod's completion index
    is its PET_NODE_RANK) and the headless Service whose subdomain makes PET_MASTER_ADDR a DNS
    name: pod ``<job>-<index>`` (the Job controller's hostname for an Indexed Job's pod) of
    subdomain ``<TrainJob>``."""
    resources = {"requests": GPUS, "limits": GPUS}
    job = created(admin, train_job("ddp", ns, image=IMAGE, numNodes=2, resourcesPerNode=resources))
    job_set = job_set_of(admin, job)
    # JobSet's defaulting webhook: DNS hostnames on, Indexed Jobs.
    assert job_set["spec"]["network"]["enableDNSHostnames"] is True

    path = f"/apis/batch/v1/namespaces/{ns}/jobs/ddp-node-0"
    batch_job = wait_for(admin, path, lambda r: r.ok, "no Job for the JobSet")
    (owner,) = batch_job["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["controller"]) == ("JobSet", "ddp", True)
    spec = batch_job["spec"]
    assert (spec["completionMode"], spec["parallelism"], spec["completions"]) == ("Indexed", 2, 2)
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == "ddp"
    (container,) = pod["containers"]
    assert (container["image"], container["resources"]) == (IMAGE, resources)
    env = env_of(container)
    assert (env["PET_NNODES"], env["PET_NPROC_PER_NODE"]) == ("2", "auto")
    assert env["PET_MASTER_ADDR"] == "ddp-node-0-0.ddp"

    path = f"/api/v1/namespaces/{ns}/services/ddp"
    service = wait_for(admin, path, lambda r: r.ok, "no headless Service for the JobSet")["spec"]
    assert service["clusterIP"] == "None"
    assert service["selector"] == {"jobset.sigs.k8s.io/jobset-name": "ddp"}
    assert service["publishNotReadyAddresses"] is True


def test_a_name_too_long_for_its_pods_gets_no_job_set(admin, ns):
    """The Trainer admits a TrainJob of any DNS-1035 name (up to 63 characters), but JobSet's
    webhook refuses a JobSet whose pods' names would be longer than 63 characters:
    ``<name>-node-<job index>-<pod index>-<5 random>``. Of 2 nodes, 48 characters is the most:
    one more and the TrainJob stays with no JobSet, the Trainer saying why in an Event."""
    created(admin, train_job("q" * 48, ns, image=IMAGE, numNodes=2))
    job_set_of(admin, {"metadata": {"name": "q" * 48, "namespace": ns}})

    name = "q" * 49
    created(admin, train_job(name, ns, image=IMAGE, numNodes=2))
    events = (
        f"/api/v1/namespaces/{ns}/events"
        f"?fieldSelector=involvedObject.name={name},reason=TrainJobResourcesCreationFailed"
    )
    found = wait_for(admin, events, lambda r: r.ok and r.json()["items"], "no Event of why")
    message = found["items"][0]["message"]
    assert 'admission webhook "vjobset.kb.io" denied the request' in message
    assert "pod names generated for this JobSet will exceed 63 characters" in message
    assert admin.request("GET", JOBSETS.format(ns=ns) + f"/{name}").status_code == 404


def test_a_suspended_train_job_is_marked_suspended(admin, ns):
    """The one condition the Trainer sets with nothing running (its status subresource)."""
    job = train_job("held", ns, image=IMAGE, numNodes=2)
    job["spec"]["suspend"] = True
    job_set = job_set_of(admin, created(admin, job))
    assert job_set["spec"]["suspend"] is True

    def suspended(resp):
        conditions = (resp.json().get("status") or {}).get("conditions") or []
        return any(c["type"] == "Suspended" and c["status"] == "True" for c in conditions)

    path = TRAINJOBS.format(ns=ns) + "/held"
    status = wait_for(admin, path, suspended, "no Suspended condition")["status"]
    (condition,) = status["conditions"]
    assert condition["reason"] == "Suspended"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"runtimeRef": {"name": "no-such-runtime"}},
            r'ClusterTrainingRuntime.trainer.kubeflow.org "no-such-runtime" not found: '
            r"specified clusterTrainingRuntime must be created before the TrainJob is created",
        ),
        (
            # Checked only when numProcPerNode is set (Torch.Validate returns early otherwise).
            {"trainer": {"numProcPerNode": "auto", "env": [{"name": "PET_NNODES", "value": "4"}]}},
            r"spec.trainer.env: Invalid value: .*must not have reserved envs, "
            r"invalid envs configured: \[PET_NNODES\]",
        ),
        (
            {"trainer": {"numProcPerNode": "many"}},
            r'spec.trainer.numProcPerNode: Invalid value: .*"many".*: '
            r"must have an int value or \[auto cpu gpu\]",
        ),
    ],
    ids=["unknown-runtime", "reserved-env", "num-proc-per-node"],
)
def test_the_trainers_webhook_refuses(admin, ns, change, message):
    job = train_job("refused", ns)
    job["spec"].update(change)
    resp = admin.create(job)
    assert resp.status_code == 403, resp.text
    text = resp.json()["message"]
    assert text.startswith(
        'admission webhook "validator.trainjob.trainer.kubeflow.org" denied the request'
    )
    assert re.search(message, text), text
    assert admin.request("GET", TRAINJOBS.format(ns=ns) + "/refused").status_code == 404


@pytest.mark.parametrize(
    ("change", "status", "message"),
    [
        (  # a CEL rule of the CRD (x-kubernetes-validations)
            {"managedBy": "example.com/other"},
            422,
            'spec.managedBy: Invalid value: "string": ManagedBy must be '
            "trainer.kubeflow.org/trainjob-controller or kueue.x-k8s.io/multikueue if set",
        ),
        ({"trainer": {"numNodes": "two"}}, 422, 'spec.trainer.numNodes: Invalid value: "string"'),
        # fieldValidation=Strict against the structural schema (what kubectl sends)
        ({"trainer": {"gpus": 2}}, 400, 'strict decoding error: unknown field "spec.trainer.gpus"'),
    ],
    ids=["managed-by", "num-nodes-type", "unknown-field"],
)
def test_the_crd_schema_refuses(admin, ns, change, status, message):
    """Refused before any webhook is called: the message is the API server's own."""
    job = train_job("invalid", ns)
    job["spec"].update(change)
    resp = admin.create(job)
    assert resp.status_code == status, resp.text
    text = resp.json()["message"]
    assert message in text
    assert "admission webhook" not in text


def test_the_runtime_ref_is_immutable(admin, ns):
    job = train_job("fixed", ns, image=IMAGE)
    job["spec"]["suspend"] = True
    created(admin, job)
    job["spec"]["runtimeRef"] = {"name": "other-runtime"}
    resp = admin.apply(job)
    assert resp.status_code == 422, resp.text
    message = resp.json()["message"]
    assert 'spec.runtimeRef: Invalid value: "object": runtimeRef is immutable' in message


def test_deleting_a_train_job_deletes_its_job_set(admin, ns):
    """The JobSet's controller reference makes it the TrainJob's dependent: the garbage
    collector (kube-controller-manager) deletes it with the TrainJob."""
    job = created(admin, train_job("gone", ns, image=IMAGE))
    job_set_of(admin, job)
    admin.ok("DELETE", TRAINJOBS.format(ns=ns) + "/gone")
    path = JOBSETS.format(ns=ns) + "/gone"
    wait_for(admin, path, lambda r: r.status_code == 404, "JobSet not deleted")


def test_the_managers_are_the_releases_go_mod_pins(kubeflow_trainer):
    """Go's build information in each binary names the module of its main package."""
    assert kubeflow_trainer.version == trainer_backend.pinned_version() == "v2.0.0"
    assert kubeflow_trainer.jobset_version == "v0.8.2"
    for binary, module, version in [
        ("trainer-controller-manager", trainer_backend.MODULE, kubeflow_trainer.version),
        (
            "jobset-controller-manager",
            trainer_backend.JOBSET_MODULE,
            kubeflow_trainer.jobset_version,
        ),
    ]:
        built = (trainer_backend.BIN / binary).read_bytes()
        assert f"\t{module}\t{version}\t".encode() in built


def test_a_missing_or_stale_manager_fails_and_never_skips(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_backend, "BIN", tmp_path)
    monkeypatch.setattr(trainer_backend, "MANIFESTS", tmp_path)
    with (
        pytest.raises(FileNotFoundError, match="run `make backend-trainer`"),
        trainer_backend.trainer_backend(tmp_path / "work"),
    ):
        pytest.fail("started without the managers")
    for binary, module, version in [
        ("trainer-controller-manager", "github.com/kubeflow/trainer/v2", "v1.9.9"),
        ("jobset-controller-manager", "sigs.k8s.io/jobset", "v0.8.2"),
    ]:
        (tmp_path / binary).write_bytes(f"\t{module}\t{version}\t".encode())
        (tmp_path / binary).chmod(0o755)
    (tmp_path / "VERSION").write_text("v2.0.0\n")
    with (
        pytest.raises(
            RuntimeError, match="is not github.com/kubeflow/trainer/v2 v2.0.0: run `make"
        ),
        trainer_backend.trainer_backend(tmp_path / "work"),
    ):
        pytest.fail("started a manager of another release")
