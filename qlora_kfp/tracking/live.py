"""Watching a run while it trains: metrics streamed to MLflow, system metrics, log progress.

A ten-hour train task that reports only when it ends shows nothing while it runs, and a
preempted pod would report nothing at all. Here every logged training row goes to the stage's
MLflow run (and the parent's) the moment the Trainer logs it, MLflow samples CPU, memory and
(with ``nvidia-ml-py``) GPU utilisation as system metrics, and the task log, which is what the
KFP UI shows of a running task, gets one progress line per logging step.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator

from qlora_kfp.tracking import stage_runs

log = logging.getLogger(__name__)
# Per-step keys a train row may carry (see stages.train's recorder), as MLflow histories.
HISTORY_KEYS = ("loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_s", "gpu_mem_gib")
SYSTEM_METRICS_INTERVAL_S = 10.0
PROGRESS = "progress: %s"  # the task log's progress line (app/progress.py shows it)


def metric_streamer(run: stage_runs.StageRun) -> Callable[[dict], None]:
    """A callback that logs one training row (``step`` plus metrics) to ``run`` at once."""

    def stream(row: dict) -> None:
        values = {k: row[k] for k in HISTORY_KEYS if k in row}
        if values:
            try:
                run.metrics(values, step=int(row["step"]))
            except Exception as exc:  # noqa: BLE001 - a tracking hiccup must not stop training
                log.warning("could not stream metrics of step %s to MLflow: %s", row["step"], exc)

    return stream


@contextlib.contextmanager
def system_metrics(run_id: str, interval_s: float = SYSTEM_METRICS_INTERVAL_S) -> Iterator[None]:
    """Sample CPU, memory, disk, network and GPU use into ``run_id`` (``system/...`` metrics,
    the MLflow UI's system metrics tab) while the block runs.

    GPU metrics only when this process has a GPU: NVML lists every GPU of the host whatever
    the process may use, so a CPU-only run (``CUDA_VISIBLE_DEVICES=""``, a CPU task on a GPU
    host) would log a chart per metric per GPU it never touched.
    """
    if not run_id:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    class Monitor(SystemMetricsMonitor):
        def _initialize_gpu_monitor(self):
            return super()._initialize_gpu_monitor() if _uses_gpu() else None

    monitor = Monitor(run_id, sampling_interval=interval_s)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


@contextlib.contextmanager
def progress_label(label: str) -> Iterator[None]:
    """Progress lines name ``label`` (a sweep trial: ``progress: [trial-ab12cd34] step ...``)
    while the block runs, so trials training at once stay apart in a log they share."""
    if not label:
        yield
        return

    def add_label(record: logging.LogRecord) -> bool:
        if record.msg == PROGRESS:
            record.msg = f"progress: [{label}] %s"
        return True

    log.addFilter(add_label)
    try:
        yield
    finally:
        log.removeFilter(add_label)


def _uses_gpu() -> bool:
    """Whether this process sees a CUDA (or ROCm) device."""
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


class Progress:
    """One log line per logged training step: position, loss, speed and time left."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self, row: dict, max_steps: int) -> str:
        step = int(row["step"])
        elapsed = time.perf_counter() - self.t0
        parts = [
            f"step {step}/{max_steps}" + (f" ({100 * step / max_steps:.0f}%)" if max_steps else "")
        ]
        for key, fmt in (("loss", ".4f"), ("eval_loss", ".4f"), ("learning_rate", ".2e")):
            if key in row:
                parts.append(f"{key} {row[key]:{fmt}}")
        if "tokens_per_s" in row:
            parts.append(f"{row['tokens_per_s']:.0f} tokens/s")
        if 0 < step < max_steps:
            left = elapsed / step * (max_steps - step)
            parts.append(f"eta {time.strftime('%H:%M:%S', time.gmtime(left))}")
        line = " | ".join(parts)
        log.info(PROGRESS, line)
        return line
