"""Several GPUs in one pod: one training process per GPU (DDP of the LoRA weights).

Each process loads the 4-bit base onto its own GPU, trains on its own micro-batches and
averages the LoRA gradients with the others (transformers' Trainer wraps the model in
``DistributedDataParallel`` when it finds itself in a launched process). Rank 0 alone writes
what the run leaves: the adapter, checkpoints' seals, the logged rows.

How the processes start: the train stage, still one process, runs
``python -m torch.distributed.run --standalone --nproc_per_node N -m <worker> job.json`` as
its child (:func:`launch`) and waits. Chosen over the alternatives because:

* re-executing the whole task under torchrun would make N processes open the task's MLflow
  run, KFP metrics and S3 copies; here the task stays one process and only training forks;
* ``torch.multiprocessing.spawn`` (and ``accelerate.notebook_launcher``) leave a failed rank's
  siblings blocked in a collective forever; torchrun's agent stops every rank when one fails,
  and sets the ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` variables the Trainer reads.

Every process dies with its parent (Linux ``PR_SET_PDEATHSIG``): torchrun starts its ranks
in sessions of their own, so a stage killed outright (preemption, ``kill -9`` of its process
group) would otherwise leave them training, racing the retried stage for the checkpoints and
the adapter. This module's ``__main__`` is torchrun with that set (:func:`die_with_parent`).

The worker writes each logged row to ``rows.jsonl`` (the stage relays them to ``on_log``, so
MLflow sees every step as it happens), its result to ``result.json`` or its error to
``error-<rank>.json``; :func:`launch` turns the lowest rank's error back into the exception
the worker raised.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from qlora_kfp import env, errors
from qlora_kfp.configs import TrainConfig
from qlora_kfp.errors import ConfigError

log = logging.getLogger(__name__)
ROWS, RESULT, POLL_S = "rows.jsonl", "result.json", 0.5


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def world_size(cfg: TrainConfig) -> int:
    """The processes to train with: ``num_processes``, or one per visible GPU (1 on the CPU).

    Raises:
        ConfigError: more processes than the pod's GPUs (each process needs its own).
    """
    gpus = visible_gpus()
    n = cfg.num_processes or max(gpus, 1)
    if gpus and n > gpus:
        raise ConfigError(
            f"num_processes={n} is invalid: this pod sees {gpus} GPU(s); use 0 (one per GPU) "
            f"or compile the pipeline with QLORA_KFP_GPUS={n} so the train task gets {n}"
        )
    return n


def launched() -> bool:
    """Whether this process is one of a launched group (torchrun sets these)."""
    return env.present("LOCAL_RANK") and env.present("WORLD_SIZE")


def rank() -> int:
    return env.integer("RANK") if launched() else 0


def local_rank() -> int:
    return env.integer("LOCAL_RANK") if launched() else 0


def current_world() -> int:
    return env.integer("WORLD_SIZE") if launched() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process or before the group exists)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce(values: list[float], op: str = "sum") -> list[float]:
    """``values`` summed (or their maximum, ``op="max"``) over every rank."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return values
    dev = f"cuda:{local_rank()}" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def row_writer(folder: Path) -> Callable[[dict], None]:
    """An ``on_log`` for rank 0 of a launched group: one JSON line a row, flushed at once."""

    def write(row: dict) -> None:
        with open(folder / ROWS, "a") as f:
            f.write(json.dumps(row) + "\n")

    return write


def error_record(exc: BaseException) -> dict:
    """What a process failed with, as JSON, for :func:`raise_record` in another process."""
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "retryable": bool(getattr(exc, "retryable", False)),
    }


def write_error(folder: Path, exc: BaseException) -> None:
    """What a rank failed with, for :func:`launch` to raise again in the stage's process."""
    (folder / f"error-{rank()}.json").write_text(json.dumps(error_record(exc)))


def raise_record(rec: dict, suffix: str = "") -> None:
    """Raise the error :func:`error_record` recorded: the same :class:`QloraError` class
    (and retryability), any other as a RuntimeError naming its type; ``suffix`` is added to
    the message."""
    cls = getattr(errors, rec["type"], None)
    message = rec["message"] + suffix
    if isinstance(cls, type) and issubclass(cls, errors.QloraError):
        if issubclass(cls, (errors.OutputError, errors.TrainJobError)):
            raise cls(message, retryable=rec["retryable"])
        raise cls(message)
    raise RuntimeError(f"{rec['type']}: {message}")


def _raise_error(folder: Path, code: int) -> None:
    found = sorted(folder.glob("error-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    if not found:
        raise RuntimeError(
            f"a training process failed (exit code {code}) without an error of its own "
            "(killed, or out of host memory); its log is above"
        )
    raise_record(json.loads(found[0].read_text()))


def launch(
    module: str,
    job: dict,
    nproc: int,
    on_row: Callable[[dict], None] | None,
    rendezvous: list[str] | None = None,
    expect_result: bool = True,
) -> dict:
    """Run ``python -m module <job.json>`` in ``nproc`` processes under torchrun and wait.

    Args:
        module: The worker: reads the job (``job["folder"]`` is added), trains, writes
            ``result.json`` on rank 0.
        job: JSON-able arguments of the worker.
        nproc: Processes (one per GPU).
        on_row: Called in this process with every row rank 0 logs, as it logs it.
        rendezvous: torchrun's arguments for finding the other processes (default
            ``--standalone``: all of them here); one node of several gives ``--nnodes``,
            ``--node_rank``, ``--master_addr`` and ``--master_port``.
        expect_result: Whether rank 0 is here, to write ``result.json`` (not on the other
            nodes of several).

    Returns:
        The worker's ``result.json`` (``{}`` where it is not expected).
    """
    with tempfile.TemporaryDirectory(prefix="qlora-kfp-ranks-") as tmp:
        folder = Path(tmp)
        (folder / "job.json").write_text(json.dumps({**job, "folder": tmp}))
        cmd = [sys.executable, "-m", __name__, *(rendezvous or ["--standalone"])]  # torchrun
        cmd += [f"--nproc_per_node={nproc}", "-m", module, str(folder / "job.json")]
        log.info("training in %d processes: %s", nproc, " ".join(cmd))
        # One thread a rank for CPU ops (torchrun's default too), said aloud to silence it.
        ranks_env = {**os.environ, "OMP_NUM_THREADS": env.text("OMP_NUM_THREADS")}
        proc = subprocess.Popen(cmd, env=ranks_env)  # its output goes to the task's log
        offset = 0
        try:
            while True:
                done = proc.poll() is not None
                offset = _relay(folder / ROWS, offset, on_row)
                if done:
                    break
                time.sleep(POLL_S)
        finally:
            if proc.poll() is None:  # this process is failing: take the ranks down with it
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        if proc.returncode or expect_result and not (folder / RESULT).is_file():
            _raise_error(folder, proc.returncode)
        return json.loads((folder / RESULT).read_text()) if expect_result else {}


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux; elsewhere a no-op).

    A parent that died before this call leaves the process adopted: it exits at once.
    """
    import ctypes
    import signal

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # no prctl: not Linux
        return
    if os.getppid() != parent:
        os._exit(1)


def _relay(path: Path, offset: int, on_row: Callable[[dict], None] | None) -> int:
    """Hand the complete lines after ``offset`` to ``on_row``; returns the new offset."""
    if not path.is_file():
        return offset
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1  # a line still being written waits for the next poll
    for line in data[:end].splitlines():
        if on_row is not None and line.strip():
            on_row(json.loads(line))
    return offset + end


if __name__ == "__main__":  # torchrun, dying with the stage that started it
    import runpy

    die_with_parent()
    runpy.run_module("torch.distributed.run", run_name="__main__", alter_sys=True)
    from qlora_kfp import fast_exit

    fast_exit.at_exit_leave()  # every rank done (a failed one raised above)
