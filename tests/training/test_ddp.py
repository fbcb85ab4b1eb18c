"""Several processes (DDP) on the CPU with gloo: the same adapter as one process on the same
global batch, and a killed multi-process run resumes to the same adapter.

Each run starts two train processes under torchrun (``num_processes=2``), on the tiny random
Llama with real bitsandbytes 4-bit layers, as the train stage does on a pod's GPUs.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from support.ranks import CFG, adapter, kill_once_sealed, result, start

from qlora_kfp.storage.manifest import verify

pytestmark = pytest.mark.slow


def test_two_processes_give_one_process_s_adapter_on_the_same_global_batch(
    quantized, prepared, rank_site, two_processes, tmp_path
):
    out2, two = two_processes
    one = result(
        start(
            quantized.path,
            prepared.path,
            tmp_path / "one",
            rank_site,
            num_processes=1,
            batch_size=4,
        )
    )
    assert two["metrics"]["processes"] == 2 and one["metrics"]["processes"] == 1
    assert two["metrics"]["steps"] == one["metrics"]["steps"] == 8
    # Rank 0's rows reach the stage's on_log as they are logged (MLflow's live metrics).
    assert [r["step"] for r in two["relayed"]] == [r["step"] for r in two["history"]]
    losses = [[r["loss"] for r in run["history"] if "loss" in r] for run in (one, two)]
    # Step 1 of 2 x 2 rows is step 1 of 4 rows: accelerate deals the sampler's batches 2k and
    # 2k+1 to ranks 0 and 1, and the loss is the mean over every rank's tokens (the Trainer
    # gathers the token count), so DDP's averaged gradient is one process's gradient.
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    a, b = adapter(tmp_path / "one"), adapter(out2)
    assert a.keys() == b.keys()
    diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    # The gradients differ only by float32 summation order (one gradient of 4 rows against
    # two of 2 averaged by gloo). AdamW divides by sqrt(v): an element whose gradient is
    # near 0 turns that rounding into a visible update difference. Measured over 8 steps:
    # one of 2,048 elements 8.2e-6 apart, every other < 1e-6. A wrong batch or loss weighting
    # moves many elements by about the learning rate (3e-3).
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=CFG["learning_rate"] / 100)
    assert (diffs > 1e-6).float().mean() < 0.01
    # Rank 0 alone wrote the adapter folder; the checkpoints are gone once it is complete.
    assert sorted(p.name for p in out2.parent.iterdir()) == ["adapter"]


def test_a_killed_two_process_run_resumes_to_the_same_adapter(
    quantized, prepared, rank_site, two_processes, tmp_path
):
    out2, _ = two_processes
    out = tmp_path / "killed"
    ckpts = Path(f"{out}.checkpoints")
    proc = start(
        quantized.path, prepared.path, out, rank_site, step_s=0.4, num_processes=2, batch_size=2
    )
    kill_once_sealed(proc, ckpts / "checkpoint-3")  # preemption: the stage and torchrun
    time.sleep(3)  # ~7 steps' time: ranks left running would save checkpoint-6 or finish
    verify(ckpts / "checkpoint-3", "train-checkpoint")
    assert not (ckpts / "checkpoint-6").exists(), "the ranks outlived their launcher"
    assert not out.exists(), "a killed run must leave no adapter"
    # Each rank's RNG state is in the sealed checkpoint: the seal waited for rank 1.
    assert {p.name for p in (ckpts / "checkpoint-3").glob("rng_state*")} >= {
        "rng_state_0.pth",
        "rng_state_1.pth",
    }

    resumed = result(
        start(quantized.path, prepared.path, out, rank_site, num_processes=2, batch_size=2)
    )
    assert resumed["metrics"]["resumed_from_step"] == 3 and resumed["metrics"]["steps"] == 8
    a, b = adapter(out2), adapter(out)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_a_nan_loss_on_one_rank_stops_every_rank(quantized, prepared, rank_site, tmp_path):
    """Rank 1's loss alone turns NaN at step 2: its gradient poisons the averaged one, whose
    norm every rank logs (the Trainer leaves NaN losses out of the logged loss), so each
    rank's own guard stops it at that step (none waits in a collective for a rank that
    stopped), and the stage raises the divergence, with no adapter."""
    out = tmp_path / "nan"
    proc = start(
        quantized.path, prepared.path, out, rank_site, nan_rank="1", num_processes=2, batch_size=2
    )
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "TrainingDivergedError: training diverged (grad_norm is nan at step 2)" in err, err[
        -3000:
    ]
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.glob("rank-*")) == ["rank-0-step-2", "rank-1-step-2"]
