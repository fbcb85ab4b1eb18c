"""The train stage as a TrainJob of two nodes, on the CPU: the adapter of one pod.

``run_train`` with ``train_runner=trainjob`` runs as in the train task: it writes the job to S3
(the moto server, tests/support/servers.py), creates the TrainJob in a real API server
(tests/support/kube_apiserver.py, as the qlora-kfp-runner service account) and watches it. The
Trainer and the kubelet cannot run here: :class:`trainjob_cluster.LocalTrainer` runs the
TrainJob's own command as two local node processes (``python -m qlora_kfp.stages.train_nodes
<job.json>`` with ``PET_NNODES=2``, ``PET_NPROC_PER_NODE=1``, ``PET_NODE_RANK=0/1``, the
rendezvous on 127.0.0.1 and a free port, gloo, each node its own cache disk) and sets the
TrainJob Complete. Two nodes of one process and 2 rows a step make the adapter two processes
of one pod make on the same global batch of 4 rows (tests/training/test_ddp.py, whose tolerance this is).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from support.ranks import CFG, adapter
from support.trainjob_cluster import LocalTrainer, profile_namespace, runner_kubeconfig

from qlora_kfp.configs import TrainConfig
from qlora_kfp.stages.train import run_train
from qlora_kfp.storage import s3
from qlora_kfp.storage.manifest import verify
from qlora_kfp.training import trainjob_logs

pytestmark = [pytest.mark.slow, pytest.mark.integration]

STORE = "s3://data/run-1"


def test_two_nodes_give_one_pod_s_adapter_on_the_same_global_batch(
    kube, s3_env, quantized, prepared, two_processes, tmp_path, monkeypatch
):
    """Against the DDP tests' run of one pod's 2 processes x 2 rows (conftest's two_processes),
    on tests/support/ranks.py's settings."""
    (tmp_path / "overlay").mkdir()
    namespace = profile_namespace(kube, "trainjob-nodes", tmp_path / "overlay")
    monkeypatch.setenv("KUBECONFIG", runner_kubeconfig(kube, namespace, tmp_path / "kubeconfig"))
    # Outside a pod the task names the nodes' image and GPUs itself (none: the CPU).
    monkeypatch.setenv("QLORA_KFP_IMAGE", "registry.example.com/qlora-kfp-gpu:test")
    monkeypatch.setenv("QLORA_KFP_GPUS", "0")
    monkeypatch.setenv("KFP_RUN_ID", "run-1")
    t0 = time.monotonic()
    trainer = LocalTrainer(kube, namespace, {**s3_env.env(), "HF_HUB_OFFLINE": "1"}, tmp_path)
    trainer.start()
    # The dataset as its stage published it; the model published nowhere: the task copies it.
    published = s3.upload_folder(prepared.path, f"{STORE}/dataset")
    cfg = TrainConfig(**{**CFG, "batch_size": 2}, train_runner="trainjob", num_nodes=2)
    got = run_train(
        cfg,
        quantized.path,
        prepared.path,
        str(tmp_path / "adapter"),
        checkpoint_uri=f"{STORE}/train-checkpoints",
        job_uri=f"{STORE}/train-job",
        input_uris={"dataset": published},
    )
    took = time.monotonic() - t0
    assert trainer.error is None
    spec = trainer.trainjob["spec"]["trainer"]
    assert (spec["numNodes"], spec["numProcPerNode"]) == (2, 1)
    job = json.loads(s3.read_text(f"{STORE}/train-job/job.json"))
    assert job["dataset_uri"] == published
    assert job["model_uri"] == f"{STORE}/train-job/inputs/quantized-model"

    verify(got.path, "adapter")
    assert got.metrics["processes"] == 2 and got.metrics["steps"] == CFG["max_steps"]
    # Node 0's log carries every logged row, as the task relays it to on_log; node 1's none.
    relayed: list[dict] = []
    trainjob_logs.relay(trainer.outputs[0][0].splitlines(), relayed.append, lambda line: None)
    assert [r["step"] for r in relayed] == [r["step"] for r in got.history]
    assert trainjob_logs.ROW_MARK not in trainer.outputs[1][0]
    # Node 0 mirrored its checkpoints, sealed, for a restarted TrainJob to resume from.
    keys = {o["key"] for o in s3.list_objects(f"{STORE}/train-checkpoints")}
    assert f"run-1/train-checkpoints/checkpoint-{CFG['checkpoint_steps']}/MANIFEST.json" in keys

    pod_folder, pod = two_processes
    losses = [[r["loss"] for r in h if "loss" in r] for h in (got.history, pod["history"])]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    a, b = adapter(pod_folder), adapter(Path(got.path))
    assert a.keys() == b.keys()
    for k in a:  # test_ddp's bound: summation order apart, the same updates
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=CFG["learning_rate"] / 100)
    diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert (diffs > 1e-6).float().mean() < 0.01
    print(
        f"TrainJob of two nodes: {took:.0f} s; with the one-pod run: {time.monotonic() - t0:.0f} s"
    )
