"""Where one KFP task reports: its MLflow run, its S3 prefix, its KFP output artifacts.

A task's :class:`RunContext` says which run it belongs to (the KFP run id, the MLflow parent
run) and, inside a sweep, which trial. Everything a stage publishes goes through it, so the
prefix rules live in one place.

The run id comes from the task's pod: every pod of a KFP run carries the label
``pipeline/runid`` (kubeflow/pipelines backend/src/apiserver/template/v2_template.go,
``SetPodMetadataLabels(LabelKeyWorkflowRunId, RunID)``), which the pipelines hand to the
container as ``KFP_RUN_ID`` (``pipelines/platform.py``) and which ``qlora-kfp run`` sets for
``kfp.local``. Cached tasks cannot take it as an input: the backend's cache key holds every
input value, and a run id in it would make every run miss the cache.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from qlora_kfp import configs, env
from qlora_kfp.errors import NotRetriedError, QloraError
from qlora_kfp.preflight import ARTIFACT_URI_ENV
from qlora_kfp.tracking import stage_runs

log = logging.getLogger("qlora_kfp")
RUN_ID_ENV = "KFP_RUN_ID"
RETRY_INDEX_ENV = "KFP_RETRY_INDEX"  # kubeflow/pipelines backend/src/v2/component/constants.go


def trial_label(overrides: dict) -> str:
    """A sweep trial's name: the same grid entry, the same name (``trial-`` + 8 hex digits).

    Numbers are compared by value: a grid entry reaches a loop task as JSON, where KFP (and
    ``kfp.local``) carry 8 as 8.0, while ``pick-best-trial`` may see the 8 the user wrote.
    """

    def canonical(value):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value

    same = {k: canonical(v) for k, v in overrides.items()}
    digest = hashlib.sha256(json.dumps(same, sort_keys=True, default=str).encode())
    return f"trial-{digest.hexdigest()[:8]}"


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")


@dataclass(frozen=True)
class RunContext:
    """Identity of one task inside one pipeline run.

    Attributes:
        kfp_run_id: The KFP run id ("" outside KFP: the CLI).
        mlflow_parent_run_id: The pipeline's parent MLflow run ("" when tracking is off or
            when the task finds it by ``kfp_run_id``).
        trial: The sweep trial (:func:`trial_label`), "" outside a sweep.
        trial_params: The trial's grid entry.
    """

    kfp_run_id: str = ""
    mlflow_parent_run_id: str = ""
    trial: str = ""
    trial_params: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_args(cls, args: dict) -> RunContext:
        """The pod's run id (``KFP_RUN_ID``) wins over the ``kfp_run_id`` argument: on a
        backend both are the run's UUID; under ``kfp.local`` the argument is the local
        runner's own number, which cached tasks cannot see."""
        overrides = args.get("config_overrides") or {}
        return cls(
            env.text(RUN_ID_ENV) or args.get("kfp_run_id") or "",
            args.get("mlflow_parent_run_id") or "",
            trial_label(overrides) if overrides else "",
            dict(overrides),
        )

    def artifact_uri(self, name: str) -> str:
        """``$QLORA_KFP_ARTIFACT_URI/<kfp run>[/<trial>]/<name>`` ("" when no artifact store
        is set): each sweep trial mirrors its checkpoints and publishes under its own prefix."""
        base = env.text(ARTIFACT_URI_ENV)
        if not base:
            return ""
        parts = [base.rstrip("/"), self.kfp_run_id or "local", self.trial, name]
        return "/".join(p for p in parts if p)

    def publish(self, folder: str, name: str) -> str:
        """Copy an artifact folder to :meth:`artifact_uri`; returns the URI ("" if none)."""
        uri = self.artifact_uri(name)
        if uri:
            from qlora_kfp.storage import s3

            s3.upload_folder(folder, uri)
            log.info("published %s to %s", folder, uri)
        return uri


@contextlib.contextmanager
def stage(
    name: str, cls: type, args: dict
) -> Iterator[tuple[Any, stage_runs.StageRun, RunContext]]:
    """Build the config, open the nested MLflow run, and turn user errors into a clean exit.

    A sweep trial's grid entry (``config_overrides``: train fields) overrides the pipeline's
    parameters for every stage of the trial (train, and evaluate's ``compute_dtype``). On
    success the stage's cost (wall time, peak memory) is logged to KFP and
    MLflow.
    """
    setup_logging()
    t0 = time.perf_counter()
    ctx = RunContext.from_args(args)
    try:
        refuse_pointless_retry(name, ctx)
        configs.check_known(
            ctx.trial_params, configs.TrainConfig.__dataclass_fields__, "config_overrides"
        )
        cfg = configs.from_params(cls, {**args, **ctx.trial_params})
        with stage_runs.stage_run(
            ctx.mlflow_parent_run_id, name, ctx.kfp_run_id, ctx.trial, ctx.trial_params
        ) as run:
            run.params(dataclasses.asdict(cfg))
            yield cfg, run, ctx
            usage = resource_usage(time.perf_counter() - t0)
            log.info("%s used %s", name, json.dumps(usage))
            # On the parent run, one name per stage, so runs compare stage by stage.
            report(run, args.get("metrics"), usage, parent_prefix=f"{name}.")
    except QloraError as exc:
        stage_runs.tag_task_failure(exc)
        fail(name, exc)


def refuse_pointless_retry(name: str, ctx: RunContext) -> None:
    """Stop a KFP retry of a stage whose earlier attempt failed with an error no retry can fix
    (a bad setting, a malformed row: ``QloraError.retryable`` False), before any GPU work.

    The backend retries a failed GPU task whatever the error (its Argo ``retryStrategy`` has
    no condition: backend/src/v2/compiler/argocompiler/container.go), after back-offs of
    minutes. From 2.17 each attempt gets ``KFP_RETRY_INDEX`` (0 for the first; same file,
    ``retryIndexEnv``); a first attempt, or a backend without it, always runs.
    """
    try:
        attempt = int(env.text(RETRY_INDEX_ENV) or 0)
    except ValueError:
        attempt = 0
    if attempt < 1:
        return
    reason = stage_runs.permanent_failure(ctx.mlflow_parent_run_id, name, ctx.kfp_run_id, ctx.trial)
    if reason:
        raise NotRetriedError(
            f"not retried (attempt {attempt + 1}): an earlier attempt failed with an error a "
            f"retry cannot fix: {reason}"
        )


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


def report(
    run: stage_runs.StageRun, kfp_metrics: Any, metrics: dict, parent_prefix: str = ""
) -> None:
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
