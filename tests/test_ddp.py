"""Several processes (DDP) on the CPU with gloo: the same adapter as one process on the same
global batch, and a killed multi-process run resumes to the same adapter.

Each run starts two train processes under torchrun (``num_processes=2``), on the tiny random
Llama with real bitsandbytes 4-bit layers, as the train stage does on a pod's GPUs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora_kfp.storage.manifest import verify

pytestmark = pytest.mark.slow

# No dropout (its masks differ between one batch of 2b rows and two of b), no length grouping
# (its mega-batches are sized by the per-process batch): the same rows in the same steps.
CFG = dict(
    max_steps=8,
    lora_r=8,
    lora_dropout=0.0,
    learning_rate=3e-3,
    logging_steps=1,
    gradient_checkpointing=False,
    length_grouping=False,
    checkpoint_steps=3,
)
# Runs the stage in its own process group, as a pod runs it; with QLORA_TEST_STEP_S every
# process (the ranks too: this file is their sitecustomize) sleeps after each step, so that
# the group can be killed between two checkpoints; with QLORA_TEST_NAN_RANK that rank's loss
# turns NaN from the second step on, and each rank whose divergence guard stops training
# leaves a file saying so in that folder.
SITE = """
import os
if os.environ.get("QLORA_TEST_NAN_RANK"):
    from pathlib import Path
    from transformers import Trainer
    from qlora_kfp.training import trainer_hooks
    if os.environ["QLORA_TEST_NAN_RANK"] == os.environ.get("RANK"):
        real_loss = Trainer.compute_loss
        def nan_loss(self, *a, **kw):
            out = real_loss(self, *a, **kw)
            if self.state.global_step < 1:
                return out
            nan = float("nan")
            return (out[0] * nan, *out[1:]) if isinstance(out, tuple) else out * nan
        Trainer.compute_loss = nan_loss
    guard = trainer_hooks.recorder
    def watched(*a, **kw):
        cb = guard(*a, **kw)
        on_log = cb.on_log
        def logged(args, state, control, **k):
            control = on_log(args, state, control, **k)
            if control.should_training_stop and "RANK" in os.environ:
                folder = Path(os.environ["QLORA_TEST_STOPPED"])
                (folder / f"rank-{os.environ['RANK']}-step-{state.global_step}").touch()
            return control
        cb.on_log = logged
        return cb
    trainer_hooks.recorder = watched
if os.environ.get("QLORA_TEST_STEP_S"):
    import time
    from qlora_kfp.training import trainer_hooks
    real = trainer_hooks.recorder
    def slowed(*a, **kw):
        cb = real(*a, **kw)
        pause = float(os.environ["QLORA_TEST_STEP_S"])
        cb.on_step_end = lambda args, state, control, **k: time.sleep(pause)
        return cb
    trainer_hooks.recorder = slowed
"""
SCRIPT = """
import json, sys
from qlora_kfp.configs import TrainConfig
from qlora_kfp.stages.train import run_train
rows = []
r = run_train(TrainConfig(**json.loads(sys.argv[1])), *sys.argv[2:5], on_log=rows.append)
print("RESULT " + json.dumps({"metrics": r.metrics, "history": r.history, "relayed": rows}))
"""


def start(quantized, prepared, out: Path, site: Path, step_s=0.0, nan_rank="", **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(site)}
    if step_s:
        env["QLORA_TEST_STEP_S"] = str(step_s)
    if nan_rank:
        env["QLORA_TEST_NAN_RANK"] = nan_rank
        env["QLORA_TEST_STOPPED"] = str(out.parent)
    argv = [json.dumps({**CFG, **kw}), quantized.path, prepared.path, str(out)]
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # its own process group, to kill it whole
    )


def result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:])


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("site")
    (folder / "sitecustomize.py").write_text(SITE)
    return folder


@pytest.fixture(scope="module")
def two_processes(quantized, prepared, site, tmp_path_factory):
    """An uninterrupted run of 2 processes x 2 rows a step."""
    out = tmp_path_factory.mktemp("ddp") / "adapter"
    return out, result(start(quantized, prepared, out, site, num_processes=2, batch_size=2))


def test_two_processes_give_one_process_s_adapter_on_the_same_global_batch(
    quantized, prepared, site, two_processes, tmp_path
):
    out2, two = two_processes
    one = result(start(quantized, prepared, tmp_path / "one", site, num_processes=1, batch_size=4))
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
    quantized, prepared, site, two_processes, tmp_path
):
    out2, _ = two_processes
    out = tmp_path / "killed"
    ckpts = Path(f"{out}.checkpoints")
    proc = start(quantized, prepared, out, site, step_s=0.4, num_processes=2, batch_size=2)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if (ckpts / "checkpoint-3" / "MANIFEST.json").is_file():
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    os.killpg(proc.pid, signal.SIGKILL)  # preemption: the stage and torchrun, no cleanup
    proc.wait()
    time.sleep(3)  # ~7 steps' time: ranks left running would save checkpoint-6 or finish
    verify(ckpts / "checkpoint-3", "train-checkpoint")
    assert not (ckpts / "checkpoint-6").exists(), "the ranks outlived their launcher"
    assert not out.exists(), "a killed run must leave no adapter"
    # Each rank's RNG state is in the sealed checkpoint: the seal waited for rank 1.
    assert {p.name for p in (ckpts / "checkpoint-3").glob("rng_state*")} >= {
        "rng_state_0.pth",
        "rng_state_1.pth",
    }

    resumed = result(start(quantized, prepared, out, site, num_processes=2, batch_size=2))
    assert resumed["metrics"]["resumed_from_step"] == 3 and resumed["metrics"]["steps"] == 8
    a, b = adapter(out2), adapter(out)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_a_nan_loss_on_one_rank_stops_every_rank(quantized, prepared, site, tmp_path):
    """Rank 1's loss alone turns NaN at step 2: its gradient poisons the averaged one, whose
    norm every rank logs (the Trainer leaves NaN losses out of the logged loss), so each
    rank's own guard stops it at that step (none waits in a collective for a rank that
    stopped), and the stage raises the divergence, with no adapter."""
    out = tmp_path / "nan"
    proc = start(quantized, prepared, out, site, nan_rank="1", num_processes=2, batch_size=2)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "TrainingDivergedError: training diverged (grad_norm is nan at step 2)" in err, err[
        -3000:
    ]
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.glob("rank-*")) == ["rank-0-step-2", "rank-1-step-2"]
