"""Where one KFP task reports: its MLflow run, its S3 prefix, its KFP output artifacts.

A task's :class:`RunContext` is built from the two bookkeeping parameters every stage
component takes (``mlflow_parent_run_id``, ``kfp_run_id``) and the sweep trial it belongs to,
if any. Everything a stage publishes goes through it, so the prefix rules live in one place.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from qlora_kfp import configs
from qlora_kfp.errors import QloraError
from qlora_kfp.preflight import ARTIFACT_URI_ENV
from qlora_kfp.tracking import runs

log = logging.getLogger("qlora_kfp")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")


@dataclass(frozen=True)
class RunContext:
    """Identity of one task inside one pipeline run.

    Attributes:
        kfp_run_id: The KFP run id ("" outside KFP: the CLI).
        mlflow_parent_run_id: The pipeline's parent MLflow run ("" when tracking is off or
            when the task finds it by ``kfp_run_id``).
    """

    kfp_run_id: str = ""
    mlflow_parent_run_id: str = ""

    @classmethod
    def from_args(cls, args: dict) -> RunContext:
        return cls(args.get("kfp_run_id") or "", args.get("mlflow_parent_run_id") or "")

    def artifact_uri(self, name: str) -> str:
        """``$QLORA_KFP_ARTIFACT_URI/<kfp run>/<name>`` ("" when no artifact store is set)."""
        base = os.environ.get(ARTIFACT_URI_ENV, "")
        if not base:
            return ""
        return f"{base.rstrip('/')}/{self.kfp_run_id or 'local'}/{name}"

    def publish(self, folder: str, name: str) -> str:
        """Copy an artifact folder to :meth:`artifact_uri`; returns the URI ("" if none)."""
        uri = self.artifact_uri(name)
        if uri:
            from qlora_kfp.storage import s3

            s3.upload_folder(folder, uri)
            log.info("published %s to %s", folder, uri)
        return uri


@contextlib.contextmanager
def stage(name: str, cls: type, args: dict) -> Iterator[tuple[Any, runs.StageRun, RunContext]]:
    """Build the config, open the nested MLflow run, and turn user errors into a clean exit.

    On success the stage's cost (wall time, peak memory) is logged to KFP and MLflow.
    """
    setup_logging()
    t0 = time.perf_counter()
    ctx = RunContext.from_args(args)
    try:
        cfg = configs.from_params(cls, args)
        with runs.stage_run(ctx.mlflow_parent_run_id, name, ctx.kfp_run_id) as run:
            run.params(dataclasses.asdict(cfg))
            yield cfg, run, ctx
            usage = resource_usage(time.perf_counter() - t0)
            log.info("%s used %s", name, json.dumps(usage))
            # On the parent run, one name per stage, so runs compare stage by stage.
            report(run, args.get("metrics"), usage, parent_prefix=f"{name}.")
    except QloraError as exc:
        fail(name, exc)


def fail(name: str, exc: QloraError) -> NoReturn:
    """End the task with a one-line message instead of a library traceback."""
    log.error("%s failed: %s", name, exc)
    sys.exit(f"{name} failed: {exc}")


def resource_usage(seconds: float) -> dict[str, float]:
    """The stage's wall time and peak memory: this process's RSS and, when it used CUDA, the
    GPU's (each KFP task is its own process, so the peaks are the stage's own)."""
    import resource

    usage = {
        "stage_seconds": round(seconds, 2),
        # ru_maxrss is in KiB on Linux.
        "stage_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
    }
    torch = sys.modules.get("torch")  # a stage that never imported torch used no GPU
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        usage["stage_gpu_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        usage["stage_gpu_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
    return usage


def report(run: runs.StageRun, kfp_metrics: Any, metrics: dict, parent_prefix: str = "") -> None:
    """Log numeric metrics to the KFP Metrics artifact and to MLflow (stage and parent run,
    there under ``parent_prefix`` + name)."""
    for k, v in metrics.items():
        if isinstance(v, int | float) and not isinstance(v, bool) and kfp_metrics is not None:
            kfp_metrics.log_metric(k, float(v))
    run.metrics(metrics, parent_prefix=parent_prefix)


def html_with_image(png: str | Path, title: str) -> str:
    data = base64.b64encode(Path(png).read_bytes()).decode()
    return f"<html><body><h3>{title}</h3><img src='data:image/png;base64,{data}'/></body></html>"


def mark(artifact: Any, **meta: Any) -> None:
    """Add metadata (digests, S3 copies) to a KFP output artifact; empty values are left out."""
    if artifact is not None and hasattr(artifact, "metadata"):
        artifact.metadata.update({k: v for k, v in meta.items() if v not in (None, "")})
