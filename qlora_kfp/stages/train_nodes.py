"""One node of the train stage's TrainJob (``train_runner=trainjob``): what each pod runs.

Usage (the TrainJob's command, :func:`qlora_kfp.training.trainjob_spec.trainjob`):
``python -m qlora_kfp.stages.train_nodes s3://<store>/<run>/train-job/job.json``.

Kubeflow Trainer's torch plugin gives each node's container ``PET_NNODES``,
``PET_NPROC_PER_NODE``, ``PET_NODE_RANK`` (the pod's Job completion index),
``PET_MASTER_ADDR`` (node 0's pod, ``<trainjob>-node-0-0.<trainjob>``) and ``PET_MASTER_PORT``
(29500): Trainer v2.0.0 pkg/runtime/framework/plugins/torch/torch.go, EnforceMLPolicy, with
the names of pkg/constants/constants.go. A PyTorchJob's (``train_runner=pytorchjob``) get
them from the Training Operator (v1.8.1 pkg/controller.v1/pytorch/envvar.go setPodEnv,
master.go): ``PET_NNODES`` (the replicas), ``PET_NPROC_PER_NODE`` (``nprocPerNode``),
``PET_NODE_RANK`` (0 for the Master, 1 + index for a Worker), ``PET_MASTER_ADDR``
(``<job>-master-0``) and ``PET_MASTER_PORT`` (the container's ``pytorchjob-port``), with
``MASTER_ADDR``, ``MASTER_PORT``, ``RANK`` (the node's rank) and ``WORLD_SIZE`` (all
processes) beside them, which older operators set alone: :func:`node_env` falls back on those
where a ``PET_`` one is missing. Each node downloads the job and its inputs from S3
(cached per node, as any ``s3://`` source), finds the checkpoint to resume from (the S3
mirror: every node finds the same one, as nothing trains before they all start), and runs
:mod:`qlora_kfp.stages.train_ranks` under torchrun with those values as its static
rendezvous (:func:`qlora_kfp.training.distributed.launch`), as the task's pod does with
``--standalone``. Global rank 0, on node 0, writes the adapter and the training rows; node 0
prints each row after :data:`~qlora_kfp.training.trainjob_logs.ROW_MARK` for the task to
relay, uploads the adapter (its manifest last) and then ``result.json``. A node that fails
records its error under the job's ``errors/`` for the task to raise as the stage's own.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import sys
from dataclasses import asdict

from qlora_kfp import env
from qlora_kfp.configs import TrainConfig
from qlora_kfp.errors import ConfigError
from qlora_kfp.storage import s3, sources
from qlora_kfp.storage.writes import output_lock
from qlora_kfp.training import distributed, resume
from qlora_kfp.training.trainjob_logs import ROW_MARK

log = logging.getLogger("qlora_kfp.stages.train")


def print_row(row: dict) -> None:
    """A training row into node 0's log, for the task to relay to its ``on_log``."""
    print(ROW_MARK + json.dumps(row), flush=True)


def node_env() -> dict[str, str]:
    """torchrun's ``PET_*`` values for this node (without the prefix), the Trainer's or the
    Training Operator's; the rendezvous address and port from ``MASTER_ADDR`` and
    ``MASTER_PORT`` where only those are set (operators before v1.7 set no ``PET_MASTER_*``),
    the node's rank from ``RANK`` (the operator's: the node's, not a process's)."""
    out = {
        name: env.text(f"PET_{name}")
        for name in ("NNODES", "NPROC_PER_NODE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    out["MASTER_ADDR"] = out["MASTER_ADDR"] or env.text("MASTER_ADDR")
    out["MASTER_PORT"] = out["MASTER_PORT"] or env.text("MASTER_PORT")
    out["NODE_RANK"] = out["NODE_RANK"] or env.text("RANK")
    return out


def train_node(job_uri: str, job: dict) -> None:
    """This node's part of the job ``job_uri`` holds (``job``)."""
    cfg = TrainConfig(**job["config"])
    pet = node_env()
    nodes, procs = int(pet["NNODES"] or 0), int(pet["NPROC_PER_NODE"] or 0)
    rank = int(pet["NODE_RANK"] or 0)
    if (nodes, procs) != (cfg.num_nodes, cfg.num_processes):
        raise ConfigError(
            f"the training runtime gave this node PET_NNODES={nodes} and PET_NPROC_PER_NODE="
            f"{procs}, the job num_nodes={cfg.num_nodes} and num_processes="
            f"{cfg.num_processes}: use a runtime that keeps the TrainJob's numNodes and "
            "numProcPerNode (the Trainer's torch-distributed does)"
        )
    model_dir = sources.localize(job["model_uri"])
    dataset_dir = sources.localize(job["dataset_uri"])
    # Each node its own folder, also on a cache volume the nodes share.
    digest = hashlib.sha256(job_uri.encode()).hexdigest()[:12]
    work = sources.cache_dir() / "train-nodes" / digest / f"node-{rank}"
    output_dir, ckpt_root = work / "adapter", work / "adapter.checkpoints"
    resume_from = (
        resume.find_resume_point(ckpt_root, job["made_from"], job["checkpoint_uri"])
        if cfg.checkpoint_steps
        else None
    )
    ranks_job = dict(
        config=asdict(cfg),
        made_from=job["made_from"],
        model_dir=model_dir,
        dataset_dir=dataset_dir,
        output_dir=str(output_dir),
        ckpt_root=str(ckpt_root),
        checkpoint_uri=job["checkpoint_uri"],
        resume_from=resume_from,
    )
    # torchrun's static rendezvous: node 0's pod holds the store every rank meets at.
    rendezvous = [
        f"--nnodes={nodes}",
        f"--node_rank={rank}",
        f"--master_addr={pet['MASTER_ADDR']}",
        f"--master_port={int(pet['MASTER_PORT'] or 0)}",
    ]
    main = rank == 0
    log.info("node %d of %d: %d process(es), resuming from %s", rank, nodes, procs, resume_from)
    with output_lock(output_dir):  # taken again by this node's ranks (their parent holds it)
        res = distributed.launch(
            "qlora_kfp.stages.train_ranks",
            ranks_job,
            procs,
            print_row if main else None,
            rendezvous=rendezvous,
            expect_result=main,
        )
    if main:
        s3.upload_folder(output_dir, job["output_uri"], "adapter")
        s3.write_text(job["result_uri"], json.dumps({**res, "path": job["output_uri"]}))
        log.info("node 0 wrote the adapter to %s", job["output_uri"])


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    job_uri = (argv or sys.argv[1:])[0]
    rank, job = node_env()["NODE_RANK"] or "0", {}
    try:
        job = json.loads(s3.read_text(job_uri))
        train_node(job_uri, job)
    except Exception as exc:
        log.error("train node %s failed: %s", rank, exc)
        if job.get("errors_uri"):  # for the task to raise as the stage's own error
            record = json.dumps(distributed.error_record(exc))
            with contextlib.suppress(Exception):  # S3 itself may be what failed
                s3.write_text(f"{job['errors_uri']}/node-{rank}.json", record)
        sys.exit(f"train node {rank} failed: {type(exc).__name__}: {exc}")


if __name__ == "__main__":
    main()
