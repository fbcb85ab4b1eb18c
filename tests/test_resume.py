"""Preemption: SIGKILL the train stage mid-run, start it again, get the same adapter."""

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
from qlora_kfp.training.checkpoints import latest_local

pytestmark = pytest.mark.slow

SCRIPT = """
import json, sys, time
from qlora_kfp.stages import train
from qlora_kfp.configs import TrainConfig
slow = float(sys.argv[5])
if slow:  # make the run slow enough to be killed between two checkpoints
    real = train._callback
    def slowed(*a):
        cb = real(*a)
        cb.on_step_end = lambda args, state, control, **kw: time.sleep(slow)
        return cb
    train._callback = slowed
cfg = TrainConfig(**json.loads(sys.argv[1]))
r = train.run_train(cfg, sys.argv[2], sys.argv[3], sys.argv[4])
print("RESULT " + json.dumps(r.metrics))
"""
CFG = dict(
    max_steps=24,
    checkpoint_steps=6,
    batch_size=4,
    lora_r=8,
    lora_dropout=0.0,
    learning_rate=3e-3,
    logging_steps=2,
    gradient_checkpointing=False,
)


def start(quantized, prepared, out: Path, slow: float) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            SCRIPT,
            json.dumps(CFG),
            quantized.path,
            prepared.path,
            str(out),
            str(slow),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:])


def test_sigkill_then_restart_resumes_and_matches_an_uninterrupted_run(
    quantized, prepared, tmp_path
):
    straight = result(start(quantized, prepared, tmp_path / "straight", 0.0))
    assert straight["resumed_from_step"] == 0

    out = tmp_path / "killed"
    proc = start(quantized, prepared, out, 0.25)
    ckpts = Path(f"{out}.checkpoints")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        # Look without touching: latest_local() would remove the checkpoint being written.
        if (ckpts / "checkpoint-12" / "MANIFEST.json").is_file():
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # preemption: no cleanup, no atexit
    proc.wait()
    verify(ckpts / "checkpoint-12", "train-checkpoint")
    assert not out.exists(), "a killed run must leave no adapter"

    resumed = result(start(quantized, prepared, out, 0.0))
    assert resumed["resumed_from_step"] in (12, 18) and resumed["steps"] == 24
    a = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    b = load_file(out / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    # Same data order (restored sampler/RNG state), same optimizer state: equal up to float
    # summation order; CPU float32 runs here are bitwise equal in practice.
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert not Path(f"{out}.checkpoints").exists(), "checkpoints are removed once complete"


def test_partial_checkpoint_is_ignored(tmp_path):
    from qlora_kfp.storage.manifest import write_manifest

    good, partial = tmp_path / "checkpoint-6", tmp_path / "checkpoint-12"
    for p in (good, partial):
        p.mkdir()
        (p / "adapter_model.safetensors").write_bytes(b"x")
    write_manifest(good, "train-checkpoint")  # checkpoint-12 was cut off before its manifest
    assert latest_local(tmp_path) == good and not partial.exists()
