"""The train stage as a Kubeflow Trainer TrainJob (``train_runner=trainjob``): the task's side.

:func:`qlora_kfp.stages.train.run_train` checks the inputs as for a pod; then, instead of
training, the task writes the job under ``job_uri`` in S3 and creates a TrainJob whose nodes
(:mod:`qlora_kfp.stages.train_nodes`) read it, train together and write the adapter back:

* ``job.json``: the config (``num_processes`` resolved per node), what the run is made from,
  where the inputs, the checkpoints and the outputs are;
* ``inputs/<name>``: a copy of an input, where the artifact's own published copy (its
  ``s3_uri``) is missing or differs;
* ``adapter/`` (its manifest written last), ``result.json`` (metrics and history) by global
  rank 0; ``errors/node-<rank>.json`` by a node that fails.

The task watches the TrainJob (:mod:`qlora_kfp.training.trainjob_watch`) and, once it is
Complete, downloads the adapter into ``output_dir``; the rest of the stage (metrics, loss
curve, MLflow) is the same as after training in the task's pod.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import asdict

from qlora_kfp import env, errors
from qlora_kfp.configs import TrainConfig
from qlora_kfp.errors import SourceError, TrainJobError, TrainJobFailed
from qlora_kfp.stages.train_loop import TrainResult
from qlora_kfp.storage import s3
from qlora_kfp.storage.manifest import MANIFEST, atomic_folder, read_manifest
from qlora_kfp.training import distributed, trainjob_client, trainjob_spec, trainjob_watch
from qlora_kfp.training.trainjob_spec import TaskPod

log = logging.getLogger("qlora_kfp.stages.train")
JOB, RESULT, ADAPTER, ERRORS, INPUTS = "job.json", "result.json", "adapter", "errors", "inputs"


def write_job(
    job_uri: str,
    cfg: TrainConfig,
    paths: dict[str, str],
    made_from: dict,
    checkpoint_uri: str,
    input_uris: dict[str, str],
) -> dict:
    """Write the job the nodes read (``<job_uri>/job.json``, inputs they lack) and clear an
    earlier attempt's outputs; returns the job, ``job_json`` its own URI.

    Args:
        cfg: The config, ``num_processes`` resolved per node.
        paths: The local ``model_dir`` and ``dataset_dir``.
        input_uris: Published S3 copies of the inputs (``quantized_model``, ``dataset``),
            used where they hold the same files as the local artifacts.
    """
    job_uri = job_uri.rstrip("/")
    job = {
        "config": asdict(cfg),
        "made_from": made_from,
        "model_uri": _input(job_uri, paths["model_dir"], input_uris.get("quantized_model", "")),
        "dataset_uri": _input(job_uri, paths["dataset_dir"], input_uris.get("dataset", "")),
        "checkpoint_uri": checkpoint_uri,
        "output_uri": f"{job_uri}/{ADAPTER}",
        "result_uri": f"{job_uri}/{RESULT}",
        "errors_uri": f"{job_uri}/{ERRORS}",
    }
    # An earlier attempt's outputs must not pass for this one's.
    s3.delete_prefix(job["output_uri"])
    s3.delete_prefix(job["errors_uri"])
    s3.delete_object(job["result_uri"])
    s3.write_text(f"{job_uri}/{JOB}", json.dumps(job, indent=1))
    return {**job, "job_json": f"{job_uri}/{JOB}"}


def _input(job_uri: str, folder: str, published: str) -> str:
    """An S3 copy of a local artifact: its published one when it holds the same files, else
    a copy under the job (kept for a retry, which then uploads nothing)."""
    manifest = read_manifest(folder)
    files, kind = manifest["files"], manifest.get("kind", "input")
    own = f"{job_uri}/{INPUTS}/{kind}"
    for uri in (published, own):
        try:
            if uri and json.loads(s3.read_text(f"{uri}/{MANIFEST}"))["files"] == files:
                return uri
        except (SourceError, ValueError, KeyError):
            continue
    log.info("uploading %s to %s for the TrainJob's nodes", folder, own)
    return s3.upload_folder(folder, own, kind)


def collect(job: dict, output_dir: str, what: str) -> TrainResult:
    """The nodes' adapter, downloaded into ``output_dir``, and their metrics and history.

    Raises:
        TrainJobError: ``what`` (the TrainJob) completed without writing them.
    """
    try:
        result = json.loads(s3.read_text(job["result_uri"]))
    except SourceError:
        raise TrainJobError(
            f"{what} completed but wrote no {RESULT} ({job['result_uri']}): does its training "
            "runtime run the TrainJob's command?"
        ) from None
    with atomic_folder(output_dir, "adapter") as tmp:
        s3.download_folder(job["output_uri"], tmp)
    log.info("downloaded the adapter of %s into %s", what, output_dir)
    return TrainResult(str(output_dir), result["metrics"], result["history"])


def raise_node_error(job: dict, what: str) -> None:
    """Raise the error a node recorded as the stage's own (nothing when none did): a setting
    or data error the user can act on ahead of a node's lost connection to the others."""
    bucket, found = s3.split_uri(job["errors_uri"])[0], []
    for obj in s3.list_objects(job["errors_uri"], missing_ok=True):
        rank = int(obj["key"].rsplit("-", 1)[-1].removesuffix(".json"))
        rec = json.loads(s3.read_text(f"s3://{bucket}/{obj['key']}"))
        cls = getattr(errors, rec["type"], None)
        ours = isinstance(cls, type) and issubclass(cls, errors.QloraError)
        found.append((not ours, rank, rec))
    if found:
        _, rank, rec = min(found, key=lambda f: f[:2])
        distributed.raise_record(rec, f" (node {rank} of {what})")


KINDS = {"trainjob": trainjob_spec.TRAINJOB, "pytorchjob": trainjob_spec.PYTORCHJOB}


class TrainJobRunner:
    """One train stage's TrainJob (or, ``kind="pytorchjob"``, Training Operator v1
    PyTorchJob): where it goes (the cluster, the task's pod) and its name."""

    def __init__(
        self,
        job_uri: str,
        cluster: trainjob_client.Cluster | None = None,
        kind: str = "trainjob",
    ):
        self.job_uri = job_uri.rstrip("/")
        self.kind = kind
        cluster = cluster or trainjob_client.connect()
        self.cluster = dataclasses.replace(cluster, job=KINDS[kind])
        raw = trainjob_client.own_pod(self.cluster)
        self.pod = TaskPod.from_pod(raw) if raw else TaskPod.outside(self.cluster.namespace)
        # One TrainJob per job folder, so per run and sweep trial; a retry replaces it.
        self.name = trainjob_spec.job_name(self.job_uri)
        self.what = self.cluster.what(self.name)

    def processes(self, cfg: TrainConfig) -> int:
        """Processes on each node: ``num_processes``, or one per GPU of the task's pod."""
        return trainjob_spec.processes_per_node(cfg, self.pod)

    def body(self, cfg: TrainConfig, job_json: str) -> dict:
        """The TrainJob (or PyTorchJob) of ``job_json``, tied to the task's KFP run."""
        run = trainjob_spec.labels(env.text("KFP_RUN_ID"))
        make = trainjob_spec.pytorchjob if self.kind == "pytorchjob" else trainjob_spec.trainjob
        return make(self.name, self.pod, cfg, job_json, run)

    def train(
        self,
        cfg: TrainConfig,
        paths: dict[str, str],
        made_from: dict,
        checkpoint_uri: str,
        on_log: Callable[[dict], None] | None,
        input_uris: dict[str, str],
    ) -> TrainResult:
        """Train in the TrainJob and download its adapter into ``paths["output_dir"]``.

        Args:
            cfg: The config, ``num_processes`` resolved (:meth:`processes`).
            paths: ``model_dir``, ``dataset_dir`` and ``output_dir``.
        """
        job = write_job(self.job_uri, cfg, paths, made_from, checkpoint_uri, input_uris)
        try:
            trainjob_watch.run(self.cluster, self.body(cfg, job["job_json"]), on_log)
        except TrainJobFailed:
            raise_node_error(job, self.what)  # the nodes' own reason, where one recorded it
            raise
        return collect(job, paths["output_dir"], self.what)
