"""Tracking into the runs made by the KFP backend's own MLflow plugin, when it is on.

From 2.17 a backend can track every pipeline run in MLflow itself (kubeflow/pipelines
proposals/12862-mlflow-integration): the API server opens a parent run per pipeline run
(``backend/src/apiserver/plugins/mlflow/run_start.go``, tagged ``kfp.pipeline_run_id``), the
driver opens a nested run per task and hands the container ``MLFLOW_TRACKING_URI``,
``MLFLOW_EXPERIMENT_ID`` and ``MLFLOW_RUN_ID`` (the task's nested run:
``backend/src/v2/common/plugins/mlflow/handler.go`` ``RetrieveUserContainerEnvVars``), the
launcher logs the task's inputs and scalar metrics and closes the nested run, and the API
server closes the parent when the run ends.

Then the stages log into those runs and open no second tree beside them: ``start-tracking``
adopts the backend's parent run (tags it as this pipeline's), each stage writes into its own
task's run, and the exit handler tags the parent but leaves closing it to the backend. Without
the plugin (older backends, ``kfp.local``) :mod:`qlora_kfp.tracking.parent_run` makes the tree.
"""

from __future__ import annotations

import logging

from qlora_kfp import env

log = logging.getLogger(__name__)
TASK_RUN_ENV = "MLFLOW_RUN_ID"
EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_ID"
KFP_RUN_TAG = "kfp.pipeline_run_id"  # run_start.go TagKFPRunID
PARENT_TAG = "mlflow.parentRunId"  # common/plugins/mlflow/client.go ParentRunTagKey


def task_run() -> str:
    """The nested run the backend made for this task ("" without the plugin)."""
    if not env.text("MLFLOW_TRACKING_URI"):
        return ""
    return env.text(TASK_RUN_ENV)


def experiment_id() -> str:
    """The experiment the backend tracks this pipeline run in ("" without the plugin)."""
    return env.text(EXPERIMENT_ENV) if task_run() else ""


def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def root_of(run_id: str) -> str:
    """The pipeline's parent run above ``run_id``: a task inside a ``ParallelFor`` hangs under
    the loop's run (handler.go: parent -> loop -> iteration), the others under the parent."""
    c, seen = _client(), set()
    while run_id and run_id not in seen:
        seen.add(run_id)
        tags = c.get_run(run_id).data.tags
        if KFP_RUN_TAG in tags or PARENT_TAG not in tags:
            return run_id
        run_id = tags[PARENT_TAG]
    return run_id


def adopt_root(experiment: str, run_name: str, tags: dict[str, str]) -> str:
    """``start-tracking`` under the plugin: tag the backend's parent run as this pipeline's.

    Returns:
        The parent run's id.
    """
    c = _client()
    own = task_run()
    root = root_of(own)
    exp = c.get_experiment(c.get_run(root).info.experiment_id)
    if experiment and exp.name != experiment:
        log.warning(
            "the backend's MLflow plugin tracks this run in experiment %r (chosen when the run "
            "was created: plugins_input.mlflow.experiment_name); mlflow_experiment=%r is not used",
            exp.name,
            experiment,
        )
    for key, value in tags.items():
        c.set_tag(root, key, value)
    if run_name:
        c.update_run(root, name=run_name)
    c.set_tag(own, "stage", "start-tracking")
    return root


def find_root(kfp_run_id: str) -> str:
    """The backend's parent run of KFP run ``kfp_run_id`` ("" if none is found)."""
    exp = experiment_id()
    if not (exp and kfp_run_id):
        return ""
    found = _client().search_runs(
        [exp], max_results=1, filter_string=f"tags.`{KFP_RUN_TAG}` = '{kfp_run_id}'"
    )
    return found[0].info.run_id if found else ""
