"""What a task the KFP backend took from its cache reported, carried into this run's MLflow run.

On a cache hit the backend runs no pod for the task (backend/src/v2/driver: the execution is
recorded as CACHED with the earlier outputs), so prepare-dataset and quantize log nothing to
this run: compared in the MLflow UI, a run that reused them would lack the dataset's
statistics, its dataset input and the quantization error. Each of them writes the id of its
stage run into its output artifact's metadata, which KFP reuses with the artifact; a later task
of the run that reads the artifact copies that stage run's results onto its own parent run,
tagged ``cached.<stage>`` with the source run id so nobody mistakes where they came from.
"""

from __future__ import annotations

import logging
from typing import Any

from qlora_kfp.tracking.parent_run import client, enabled
from qlora_kfp.tracking.stage_runs import StageRun

log = logging.getLogger(__name__)

SOURCE_KEY = "mlflow_run_id"  # artifact metadata: the stage run that produced the artifact
USAGE_PREFIX = "stage_"  # a stage's own cost (context.resource_usage): not this run's


def source_of(artifact: Any) -> str:
    """The id of the stage run that produced ``artifact`` ("" when it does not say)."""
    return str((getattr(artifact, "metadata", None) or {}).get(SOURCE_KEY) or "")


def carry_over(parent_run_id: str, stage: str, artifact: Any) -> bool:
    """Copy what ``stage`` reported when it made ``artifact`` onto ``parent_run_id``, if the
    artifact was made by another pipeline run (a cache hit).

    Copied: the stage run's metrics, under the names the stage gives them on a parent (not its
    ``stage_*`` cost: it cost this run nothing), the params the parent lacks (the stage's
    config) and its dataset inputs. MLflow being down or the
    source run being gone only logs a warning: the task's own work does not depend on it.

    Returns:
        Whether anything was carried over.
    """
    source = source_of(artifact)
    if not (enabled() and parent_run_id and source):
        return False
    tag = f"cached.{stage}"
    try:
        c = client()
        parent = c.get_run(parent_run_id)
        if tag in parent.data.tags:
            return False
        src = c.get_run(source)
        here = parent.data.tags.get("kfp.run_id")
        made_in = src.data.tags.get("kfp.run_id")
        if src.data.tags.get("mlflow.parentRunId") == parent_run_id or (here and made_in == here):
            return False  # made by this very run: it logged for itself
        # Logged through a handle on the parent alone: batches within the API's limits, and
        # only the params the parent does not have yet (they are write-once).
        onto = StageRun(parent_run_id, "", to_parent=False)
        onto.metrics({k: v for k, v in src.data.metrics.items() if not k.startswith(USAGE_PREFIX)})
        onto.params(src.data.params)
        inputs = list(src.inputs.dataset_inputs) if src.inputs else []
        if inputs:
            c.log_inputs(parent_run_id, datasets=inputs)
        # Last: the tag says the copy is complete (a cut-off copy is redone by a retry).
        onto.tags({tag: source, f"{tag}.kfp_run_id": made_in or ""})
    except Exception as exc:  # noqa: BLE001 - a missing copy must not fail the task
        log.warning(
            "could not carry %s's cached results into MLflow run %s: %s", stage, parent_run_id, exc
        )
        return False
    log.info(
        "%s came from KFP's cache: its results from MLflow run %s are on this run", stage, source
    )
    return True
