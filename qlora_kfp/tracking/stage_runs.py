"""One nested MLflow run per stage, under the pipeline's parent run.

A stage opens its run with :func:`stage_run` (or, under KFP's own MLflow plugin, writes into
the run the backend made for its task) and logs through the :class:`StageRun` handle. What the
exit handler and a retried task read back of those runs is here too: each stage's status and
failure reason, and whether an earlier attempt failed for good.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from typing import Any

from qlora_kfp.errors import TrackingError
from qlora_kfp.tracking import plugin
from qlora_kfp.tracking.parent_run import client, enabled, find_pipeline_run, provenance

log = logging.getLogger(__name__)
FAILURE_KIND_TAG = "failure_kind"  # "permanent": a retry of the task cannot succeed


def _stage_runs_of(parent_run_id: str, where: str = "") -> list:
    """The stage runs of one pipeline run, newest first.

    Found by the ``kfp.run_id`` tag every stage run inherits from its parent, not by
    ``mlflow.parentRunId``: under KFP's MLflow plugin a sweep trial's runs hang under the
    loop's run, not the parent (tracking/plugin.py).
    """
    parent = client().get_run(parent_run_id)
    kfp_run_id = parent.data.tags.get("kfp.run_id", "")
    key = (
        f"tags.`kfp.run_id` = '{kfp_run_id}'"
        if kfp_run_id
        else f"tags.`mlflow.parentRunId` = '{parent_run_id}'"
    )
    found = client().search_runs(
        [parent.info.experiment_id],
        filter_string=f"{key} {where}".strip(),
        order_by=["attributes.start_time DESC"],
    )
    return [r for r in found if "stage" in r.data.tags and r.info.run_id != parent_run_id]


def stage_statuses(parent_run_id: str) -> dict[str, tuple[str, str]]:
    """``{stage[ trial]: (MLflow status, failure reason)}`` of a pipeline run's stage runs
    (``{}`` without tracking); a stage retried by KFP counts by its newest attempt."""
    if not (enabled() and parent_run_id):
        return {}
    out: dict[str, tuple[str, str]] = {}
    for r in _stage_runs_of(parent_run_id):
        key = " ".join(filter(None, [r.data.tags["stage"], r.data.tags.get("trial")]))
        out.setdefault(key, (r.info.status, r.data.tags.get("failure_reason", "")))
    return out


def permanent_failure(parent_run_id: str, stage: str, kfp_run_id: str = "", trial: str = "") -> str:
    """The reason an earlier attempt of ``stage`` in this run failed for good ("" if none, or
    when MLflow cannot say: a retry then runs as it would without tracking)."""
    try:
        if enabled() and not parent_run_id and kfp_run_id:
            parent_run_id = find_pipeline_run("", kfp_run_id)
        if not (enabled() and parent_run_id):
            return ""
        where = f"and tags.stage = '{stage}' and tags.`{FAILURE_KIND_TAG}` = 'permanent'"
        found = _stage_runs_of(parent_run_id, where)
    except Exception as exc:  # noqa: BLE001 - the guard must not be what fails the retry
        log.warning("could not read earlier attempts of %s from MLflow: %s", stage, exc)
        return ""
    found = [r for r in found if r.data.tags.get("trial", "") == trial]
    return found[0].data.tags.get("failure_reason", "failed") if found else ""


class StageRun:
    """Logging handle of one stage's nested run (all methods are no-ops when tracking is off).

    ``to_parent`` False (a sweep trial's stages) keeps everything on the stage run: trials
    differ in their settings, so their params and histories on the one parent would be one
    trial's params beside every trial's interleaved curves.
    """

    def __init__(
        self, run_id: str, parent_run_id: str, to_parent: bool = True, own_params: bool = True
    ):
        self.run_id, self.parent_run_id, self.to_parent = run_id, parent_run_id, to_parent
        self.own_params = own_params

    def _targets(self, parent: bool) -> tuple[str, ...]:
        return (self.run_id, self.parent_run_id) if parent and self.to_parent else (self.run_id,)

    def params(self, params: dict[str, Any]) -> None:
        """Log params on the stage run and on the parent (same name, same meaning, same value)."""
        if not self.run_id:
            return
        from mlflow.entities import Param

        ps = [Param(k, str(v)) for k, v in params.items()]
        targets = self._targets(parent=True)
        for rid in targets if self.own_params else targets[1:]:
            existing = client().get_run(rid).data.params
            new = [p for p in ps if p.key not in existing]
            if new:
                client().log_batch(rid, params=new)

    def metrics(
        self,
        metrics: dict[str, Any],
        step: int | None = None,
        parent: bool = True,
        parent_prefix: str = "",
    ) -> None:
        """Log numeric metrics on the stage run and (``parent``) on the parent, there under
        ``parent_prefix`` + name: a prefix such as ``"train."`` keeps per-stage names apart."""
        if not self.run_id:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = {
            k: float(v)
            for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        targets = [(self.run_id, "")]
        if parent and self.to_parent:
            targets.append((self.parent_run_id, parent_prefix))
        for rid, pre in targets:
            ms = [Metric(pre + k, v, now, step or 0) for k, v in values.items()]
            for i in range(0, len(ms), 900):  # the REST API takes 1000 metrics per batch
                client().log_batch(rid, metrics=ms[i : i + 900])

    def artifacts(self, folder: str, path: str | None = None) -> None:
        if self.run_id:
            client().log_artifacts(self.run_id, folder, artifact_path=path)

    def artifact(self, file: str, path: str | None = None, parent: bool = False) -> None:
        if not self.run_id:
            return
        for rid in self._targets(parent):
            client().log_artifact(rid, file, artifact_path=path)

    def table(self, rows: list[dict], artifact_file: str) -> None:
        """A table (e.g. sample generations) shown in the MLflow UI's artifact view."""
        if self.run_id and rows:
            import pandas as pd

            client().log_table(self.run_id, pd.DataFrame(rows), artifact_file)

    def tags(self, tags: dict[str, str], parent: bool = False) -> None:
        if not self.run_id:
            return
        for rid in self._targets(parent):
            for k, v in tags.items():
                client().set_tag(rid, k, v)


@contextlib.contextmanager
def stage_run(
    parent_run_id: str,
    stage: str,
    kfp_run_id: str = "",
    trial: str = "",
    trial_params: dict | None = None,
) -> Iterator[StageRun]:
    """Open the nested run of one stage; it ends FAILED (and re-raises) on an exception.

    Without ``parent_run_id`` the parent is looked up by its ``kfp.run_id`` tag (cached tasks
    and tasks inside a ``dsl.ParallelFor`` get it that way). A sweep trial's stage run is
    named after the trial and tagged with its grid entry, and logs nothing to the parent.
    """
    if enabled() and not parent_run_id and kfp_run_id:
        parent_run_id = find_pipeline_run("", kfp_run_id)
        if not parent_run_id:
            log.warning(
                "no MLflow run is tagged kfp.run_id=%s: %s is not tracked", kfp_run_id, stage
            )
    if plugin.task_run():
        with _plugin_stage_run(parent_run_id, stage, trial, trial_params) as handle:
            yield handle
        return
    if not (enabled() and parent_run_id):
        yield StageRun("", "")
        return
    c = client()
    try:
        parent = c.get_run(parent_run_id)
        run = c.create_run(
            parent.info.experiment_id,
            run_name=f"{stage} {trial}" if trial else stage,
            tags={
                **_stage_tags(stage, parent.data.tags, trial, trial_params),
                "mlflow.parentRunId": parent_run_id,
            },
        )
    except Exception as exc:  # noqa: BLE001
        raise TrackingError(f"MLflow parent run {parent_run_id}: {exc}") from None
    handle = StageRun(run.info.run_id, parent_run_id, to_parent=not trial)
    try:
        yield handle
    except BaseException as exc:
        _tag_failure(run.info.run_id, exc, status="FAILED")
        raise
    c.set_terminated(run.info.run_id, status="FINISHED")


def _stage_tags(stage: str, parent_tags: dict, trial: str, trial_params: dict | None) -> dict:
    """A stage run's tags: provenance, the stage (and trial), the parent's own tags."""
    inherited = {k: v for k, v in parent_tags.items() if not k.startswith(("mlflow.", "qlora."))}
    tags = {**provenance(stage), **inherited, "stage": stage}
    if trial:
        tags.update(
            {"trial": trial, "trial.params": json.dumps(trial_params or {}, sort_keys=True)}
        )
    return tags


def tag_task_failure(exc: BaseException) -> None:
    """Under KFP's MLflow plugin, say on the task's own run why it failed before its stage run
    opened (an invalid setting, a refused retry)."""
    if plugin.task_run():
        _tag_failure(plugin.task_run(), exc)


def _tag_failure(run_id: str, exc: BaseException, status: str = "") -> None:
    """Say on ``run_id`` why the stage failed (and end it with ``status``), best effort: when
    MLflow itself is what failed, the stage's own error is the one to report."""
    # A user error (bad setting, bad row) fails the same way on every retry.
    kind = "transient" if getattr(exc, "retryable", True) else "permanent"
    try:
        client().set_tag(run_id, "failure_reason", f"{type(exc).__name__}: {exc}"[:5000])
        client().set_tag(run_id, FAILURE_KIND_TAG, kind)
        if status:
            client().set_terminated(run_id, status=status)
    except Exception as err:  # noqa: BLE001
        log.warning("could not record the failure on MLflow run %s: %s", run_id, err)


@contextlib.contextmanager
def _plugin_stage_run(
    parent_run_id: str, stage: str, trial: str, trial_params: dict | None
) -> Iterator[StageRun]:
    """The stage logs into the run the backend made for its task (``MLFLOW_RUN_ID``).

    Its params go only to the parent: the launcher logs the task's inputs as params itself,
    JSON-encoded (``"auto"`` with quotes: handler.go ``mapToParams``), and MLflow refuses a
    param logged twice with two values, which would lose the launcher's whole batch. The
    launcher also closes the run, FAILED when the task's process fails.
    """
    own = plugin.task_run()
    try:
        parent_run_id = parent_run_id or plugin.root_of(own)
        parent_tags = client().get_run(parent_run_id).data.tags if parent_run_id else {}
        for key, value in _stage_tags(stage, parent_tags, trial, trial_params).items():
            client().set_tag(own, key, value)
    except Exception as exc:  # noqa: BLE001
        raise TrackingError(f"MLflow run {own} of this task: {exc}") from None
    handle = StageRun(own, parent_run_id, to_parent=not trial, own_params=False)
    try:
        yield handle
    except BaseException as exc:
        _tag_failure(own, exc)
        raise
