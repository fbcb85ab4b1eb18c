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
from qlora_kfp.training.resume import latest_local

pytestmark = pytest.mark.slow

SCRIPT = """
import json, sys, time
from qlora_kfp.stages import train
from qlora_kfp.training import trainer_hooks
from qlora_kfp.configs import TrainConfig
from qlora_kfp.fast_exit import at_exit_leave
slow = float(sys.argv[5])
if slow:  # make the run slow enough to be killed between two checkpoints
    real = trainer_hooks.recorder
    def slowed(*a):
        cb = real(*a)
        cb.on_step_end = lambda args, state, control, **kw: time.sleep(slow)
        return cb
    trainer_hooks.recorder = slowed
cfg = TrainConfig(**json.loads(sys.argv[1]))
r = train.run_train(cfg, sys.argv[2], sys.argv[3], sys.argv[4])
print("RESULT " + json.dumps(r.metrics))
at_exit_leave()  # as the stage's KFP task leaves (qlora_kfp.fast_exit)
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
    from qlora_kfp.configs import TrainConfig
    from qlora_kfp.stages.train import run_train

    # The uninterrupted run in this process (the same code, threads and data; no process of
    # its own to start).
    straight = run_train(
        TrainConfig(**CFG), quantized.path, prepared.path, str(tmp_path / "straight")
    )
    assert straight.metrics["resumed_from_step"] == 0

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


MADE_FROM = {"config": {"lora_r": 8}, "dataset_digest": "d1", "model_digest": "m1"}


def test_partial_checkpoint_is_ignored(tmp_path):
    from qlora_kfp.storage.manifest import write_manifest

    good, partial = tmp_path / "checkpoint-6", tmp_path / "checkpoint-12"
    for p in (good, partial):
        p.mkdir()
        (p / "adapter_model.safetensors").write_bytes(b"x")
    # checkpoint-12 was cut off before its manifest
    write_manifest(good, "train-checkpoint", {"made_from": MADE_FROM})
    assert latest_local(tmp_path, MADE_FROM) == good and not partial.exists()


def test_only_checkpoints_of_this_run_are_resumed_and_nothing_else_is_touched(tmp_path):
    from qlora_kfp.storage.manifest import write_manifest

    other = {**MADE_FROM, "dataset_digest": "d2"}
    for step, record in ((6, MADE_FROM), (12, other), (18, None)):
        p = tmp_path / f"checkpoint-{step}"
        p.mkdir()
        (p / "optimizer.pt").write_bytes(b"x")
        write_manifest(p, "train-checkpoint", {"made_from": record} if record else None)
    (tmp_path / "notes.txt").write_text("the user's")
    assert latest_local(tmp_path, MADE_FROM) == tmp_path / "checkpoint-6"
    # Another run's (12) and an unrecorded one (18) can never be resumed here: removed.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-6", "notes.txt"]


# A run cut off after its first sealed checkpoint (step 2), then run again with each change.
SMALL = dict(
    max_steps=4,
    checkpoint_steps=2,
    batch_size=4,
    lora_r=8,
    lora_dropout=0.0,
    learning_rate=3e-3,
    logging_steps=1,
    gradient_checkpointing=False,
)


class Preempted(Exception):
    pass


def _stop_at(step: int):
    def on_log(row):
        if row["step"] >= step:
            raise Preempted

    return on_log


@pytest.fixture(scope="module")
def cut_off(quantized, prepared, tmp_path_factory):
    """The checkpoint folder of a run stopped after its checkpoint at step 2 was sealed."""
    from qlora_kfp.configs import TrainConfig
    from qlora_kfp.stages.train import run_train

    out = tmp_path_factory.mktemp("cut") / "adapter"
    with pytest.raises(Preempted):
        run_train(TrainConfig(**SMALL), quantized.path, prepared.path, str(out), on_log=_stop_at(3))
    root = Path(f"{out}.checkpoints")
    assert [p.name for p in root.iterdir()] == ["checkpoint-2"] and not out.exists()
    verify(root / "checkpoint-2", "train-checkpoint")
    return root


@pytest.fixture(scope="module")
def other_data(demo_assets, tmp_path_factory):
    from qlora_kfp.configs import PrepareConfig
    from qlora_kfp.stages.prepare import run_prepare

    cfg = PrepareConfig(
        data_source=demo_assets["data_source"],
        base_model=demo_assets["base_model"],
        max_seq_length=64,
        eval_fraction=0.15,
        max_rows=200,
    )
    return run_prepare(cfg, str(tmp_path_factory.mktemp("other-data") / "dataset"))


@pytest.mark.parametrize(
    "change,data,resumed,reason",
    [
        ({}, "same", 2, None),
        ({"logging_steps": 2, "gradient_checkpointing": True}, "same", 2, None),
        # What the out-of-memory hint asks for must not throw the checkpoints away.
        ({"gradient_checkpointing_offload": "on", "gpu_memory_gib": 40.0}, "same", 2, None),
        ({"learning_rate": 1e-3}, "same", 0, "learning_rate 0.003 -> 0.001"),
        ({"lora_r": 4}, "same", 0, "lora_r 8 -> 4"),
        ({}, "other", 0, "dataset "),
        # Two processes of 4 rows are a global batch of 8: another run (tests/training/test_ddp.py).
        ({"num_processes": 2}, "same", 0, "num_processes 1 -> 2"),
    ],
    ids=[
        "unchanged",
        "speed-and-logging-only",
        "memory-settings-only",
        "changed-lr",
        "changed-rank",
        "changed-data",
        "changed-process-count",
    ],
)
def test_a_rerun_resumes_only_the_same_run(
    cut_off, quantized, prepared, other_data, tmp_path, caplog, change, data, resumed, reason
):
    import logging
    import shutil

    from qlora_kfp.configs import TrainConfig
    from qlora_kfp.stages.train import run_train

    out = tmp_path / "adapter"
    shutil.copytree(cut_off, f"{out}.checkpoints")
    (Path(f"{out}.checkpoints") / "keep.txt").write_text("not ours")
    dataset = (prepared if data == "same" else other_data).path
    with caplog.at_level(logging.WARNING, logger="qlora_kfp.training.resume"):
        res = run_train(TrainConfig(**{**SMALL, **change}), quantized.path, dataset, str(out))
    assert res.metrics["resumed_from_step"] == resumed and res.metrics["steps"] == 4
    warned = [r.getMessage() for r in caplog.records if "made from other inputs" in r.getMessage()]
    if reason:
        assert len(warned) == 1 and reason in warned[0], warned
    else:
        assert not warned
    verify(out, "adapter")
    made_from = json.loads((out / "train.json").read_text())["made_from"]
    assert made_from["config"]["learning_rate"] == change.get("learning_rate", 3e-3)
    # The checkpoints are gone once the adapter is complete; the user's file is not.
    assert [p.name for p in Path(f"{out}.checkpoints").iterdir()] == ["keep.txt"]


def _full_disk_torch_save(real):
    """torch.save as it fails on a full disk: a short file, then the zip writer's RuntimeError
    (caffe2/serialize/inline_container.cc; no errno), measured on a full tmpfs."""

    def save(obj, f, *a, **kw):
        if "checkpoint-4" in str(f):
            Path(f).write_bytes(b"PK\x03\x04 short")
            raise RuntimeError(
                "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"
            )
        return real(obj, f, *a, **kw)

    return save


def _full_disk_safetensors(real):
    """safetensors' save_file as it fails on a full disk (its Rust io::Error in the text)."""
    from safetensors import SafetensorError

    def save_file(tensors, filename, *a, **kw):
        if "checkpoint-4" in str(filename):
            Path(filename).write_bytes(b"\x10\x00")
            raise SafetensorError(
                "Error while serializing: I/O error: No space left on device (os error 28)"
            )
        return real(tensors, filename, *a, **kw)

    return save_file


@pytest.mark.parametrize("writer", ["torch-save", "safetensors"])
def test_a_checkpoint_cut_off_by_a_full_disk_is_removed(
    quantized, prepared, tmp_path, monkeypatch, writer
):
    from types import SimpleNamespace

    import peft.peft_model

    from qlora_kfp.configs import TrainConfig
    from qlora_kfp.errors import OutputError
    from qlora_kfp.stages.train import run_train
    from qlora_kfp.storage import writes

    if writer == "torch-save":
        monkeypatch.setattr(torch, "save", _full_disk_torch_save(torch.save))
        full = SimpleNamespace(total=10**9, used=10**9, free=0)
        monkeypatch.setattr(writes.shutil, "disk_usage", lambda p: full)
    else:
        real = peft.peft_model.safe_save_file
        monkeypatch.setattr(peft.peft_model, "safe_save_file", _full_disk_safetensors(real))
    out = tmp_path / "adapter"
    with pytest.raises(OutputError, match="disk full") as got:
        run_train(TrainConfig(**SMALL), quantized.path, prepared.path, str(out))
    root = Path(f"{out}.checkpoints")
    assert str(got.value).startswith(f"{root}: ") and "\n" not in str(got.value)
    # The cut-off checkpoint is gone; the sealed one stays to resume from; no adapter.
    assert [p.name for p in root.iterdir()] == ["checkpoint-2"]
    verify(root / "checkpoint-2", "train-checkpoint")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.checkpoints"]
