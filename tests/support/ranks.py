"""The train stage in several processes on the CPU (gloo), as a pod runs it on its GPUs: shared
by tests/training/test_ddp.py and tests/training/test_fsdp.py (conftest.py's ``rank_site`` and
``two_processes`` fixtures use it).

The stage runs in a child process of its own process group (so a test can kill it whole, as
a preemption would), with a ``sitecustomize.py`` that every process loads, the ranks too,
holding the test hooks below.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

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
# Token ids every process's model is run on after the final evaluation, with QLORA_TEST_DUMP.
PROBE = [[1, 5, 9, 23, 44, 2, 17, 30]]
# Hooks, by environment variable:
# - QLORA_TEST_STEP_S: every process sleeps after each step, so that the group can be killed
#   between two checkpoints;
# - QLORA_TEST_NAN_RANK: that rank's loss turns NaN from the second step on, and each rank
#   whose divergence guard stops training leaves a file saying so in QLORA_TEST_STOPPED (in
#   rank processes: the hook is not installed where RANK is unset);
# - QLORA_TEST_DUMP: after each evaluation every rank runs the model on PROBE and gathers its
#   whole state (fsdp.gathered_state, a collective); rank 0 saves both in that folder.
SITE = """
import os
# This file shadows the environment's own sitecustomize (a coverage hook, a redirect of an
# editable install): run the one after it on PYTHONPATH first, as Python would have.
for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep)[1:]:
    path = os.path.join(entry, "sitecustomize.py")
    if entry and os.path.isfile(path):
        exec(compile(open(path).read(), path, "exec"), {"__name__": "sitecustomize"})
        break
# Ranks only (torchrun sets RANK): the stage and torchrun's agent, which never train, would
# import transformers' Trainer for nothing, ~7 s before the ranks start.
if os.environ.get("QLORA_TEST_NAN_RANK") and "RANK" in os.environ:
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
            if control.should_training_stop:
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
if os.environ.get("QLORA_TEST_DUMP"):
    import torch
    from qlora_kfp.training import fsdp, trainer_hooks
    recorded = trainer_hooks.recorder
    def dumping(*a, **kw):
        cb = recorded(*a, **kw)
        def on_evaluate(args, state, control, model=None, **k):
            model.eval()
            with torch.no_grad():
                logits = model(input_ids=torch.tensor(PROBE)).logits
            whole = fsdp.gathered_state(model, adapter_only=False)
            if os.environ.get("RANK", "0") == "0":
                folder = os.environ["QLORA_TEST_DUMP"]
                torch.save(logits, os.path.join(folder, "logits.pt"))
                torch.save(whole, os.path.join(folder, "state.pt"))
        cb.on_evaluate = on_evaluate
        return cb
    trainer_hooks.recorder = dumping
""".replace("PROBE", repr(PROBE))
# The stage's process, as its KFP task runs it: once the stage returns, the process leaves
# without finalizing torch, transformers and peft (qlora_kfp.fast_exit; ~1.5 s).
SCRIPT = """
import json, sys
from qlora_kfp.configs import TrainConfig
from qlora_kfp.fast_exit import at_exit_leave
from qlora_kfp.stages.train import run_train
rows = []
r = run_train(TrainConfig(**json.loads(sys.argv[1])), *sys.argv[2:5], on_log=rows.append)
print("RESULT " + json.dumps({"metrics": r.metrics, "history": r.history, "relayed": rows}))
at_exit_leave()
"""


def write_site(folder: Path) -> Path:
    """``folder`` with the hooks' ``sitecustomize.py``, to put on the processes' PYTHONPATH."""
    (folder / "sitecustomize.py").write_text(SITE)
    return folder


def start(
    model_dir: str,
    dataset_dir: str,
    out: Path,
    site: Path,
    step_s: float = 0.0,
    nan_rank: str = "",
    dump: Path | None = None,
    **kw,
) -> subprocess.Popen:
    """Start the train stage on ``CFG`` updated with ``kw``, writing the adapter to ``out``."""
    paths = [str(site), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(paths)}
    if step_s:
        env["QLORA_TEST_STEP_S"] = str(step_s)
    if nan_rank:
        env["QLORA_TEST_NAN_RANK"] = nan_rank
        env["QLORA_TEST_STOPPED"] = str(out.parent)
    if dump is not None:
        env["QLORA_TEST_DUMP"] = str(dump)
    argv = [json.dumps({**CFG, **kw}), model_dir, dataset_dir, str(out)]
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # its own process group, to kill it whole
    )


def result(proc: subprocess.Popen) -> dict:
    """The stage's metrics, history and the rows it relayed, once it has succeeded."""
    out, err = proc.communicate(timeout=600)
    # A rank's own error (a C++ abort's "terminate called", a gloo failure) is far above
    # torchrun's summary at the end: show those lines too.
    causes = [ln for ln in err.splitlines() if re.search(r"terminate|what\(\)|[Ee]rror|gloo", ln)]
    assert proc.returncode == 0, "\n".join(causes[-40:]) + "\n...\n" + err[-3000:]
    return json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:])


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def kill_once_sealed(proc: subprocess.Popen, checkpoint: Path) -> None:
    """SIGKILL the stage's whole process group (a preemption: no cleanup) once
    ``checkpoint`` is sealed; fails if the stage ends first."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if (checkpoint / "MANIFEST.json").is_file():
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
