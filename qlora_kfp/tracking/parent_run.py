"""MLflow tracking: one parent run per pipeline run, one nested run per stage.

KFP runs every stage in its own process (its own pod on a cluster), so runs are addressed by
id: the ``start-tracking`` task creates the parent run (this module) and hands its id to every
stage, which opens a child run tagged ``mlflow.parentRunId`` (:mod:`qlora_kfp.tracking.stage_runs`).
Configuration is MLflow's own environment:
``MLFLOW_TRACKING_URI`` (plus ``MLFLOW_TRACKING_USERNAME``/``PASSWORD`` or ``TOKEN``), set from
a Kubernetes Secret on a cluster. Without ``MLFLOW_TRACKING_URI`` tracking is off and every
function here is a no-op, so the stages also run without MLflow.
"""

from __future__ import annotations

import logging

from qlora_kfp import env
from qlora_kfp.errors import TrackingError
from qlora_kfp.tracking import plugin
from qlora_kfp.version import PIPELINE_VERSION, git_commit

log = logging.getLogger(__name__)
EXPERIMENTS_PAGE = 100  # experiments searched at once for a run id (cached tasks)
# What the experiment is, for MLflow's own bookkeeping (mlflow/server/js:
# ExperimentKind.CUSTOM_MODEL_DEVELOPMENT). MLflow 3.17's UI does not open it by this tag: it
# shows the view its URL's ``workflowType`` names, else the one last picked in that browser
# (localStorage ``mlflow.workflowType``), else GenAI; so links carry it (:func:`runs_table_url`).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"


def runs_table_url(ui: str, experiment_id: str) -> str:
    """The experiment's runs table in MLflow's model-training view, for a UI at ``ui``."""
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def experiment_link(experiment: str, ui: str = "") -> str | None:
    """:func:`runs_table_url` of ``experiment`` on the tracking server, or on ``ui`` (the
    ``make mlflow-ui`` address for a local store); None when it does not exist."""
    exp = client().get_experiment_by_name(experiment)
    if exp is None:
        return None
    uri = env.text("MLFLOW_TRACKING_URI")
    return runs_table_url(ui or uri, exp.experiment_id)


def enabled() -> bool:
    return bool(env.text("MLFLOW_TRACKING_URI"))


def client():
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def check_server(timeout_s: float = 10.0) -> None:
    """Fail fast with a clear message when the tracking server cannot be reached."""
    if not enabled():
        return
    uri = env.text("MLFLOW_TRACKING_URI")
    if uri.startswith(("http://", "https://")):
        import urllib.request

        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as r:
                r.read()
        except Exception as exc:  # noqa: BLE001
            raise TrackingError(
                f"MLflow tracking server {uri} is unreachable ({exc}); check MLFLOW_TRACKING_URI"
            ) from None


def provenance(task: str) -> dict[str, str]:
    """Who and what created a run: MLflow's own source, user and git tags (the UI's "Source"
    and "User" columns), with the source named after the KFP task."""
    from mlflow.tracking.context.registry import resolve_tags

    tags = resolve_tags()
    commit = git_commit()
    tags.update(
        {
            "mlflow.source.type": "JOB",
            "mlflow.source.name": f"qlora-kfp:{task}",
        }
    )
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
    return tags


def start_pipeline_run(experiment: str, run_name: str, tags: dict[str, str]) -> str:
    """Create the parent run; returns its id ("" when tracking is off)."""
    if not enabled():
        log.warning("MLFLOW_TRACKING_URI is not set: MLflow tracking is off")
        return ""
    check_server()
    import mlflow

    ours = {
        **provenance("pipeline"),
        "pipeline.version": PIPELINE_VERSION,
        "git.commit": git_commit(),
        "qlora.role": "pipeline",
        **tags,
    }
    try:
        if plugin.task_run():  # the backend made the parent run: adopt it, make no second
            return plugin.adopt_root(experiment, run_name, ours)
        root = env.text("QLORA_KFP_MLFLOW_ARTIFACT_ROOT")
        if root and mlflow.get_experiment_by_name(experiment) is None:
            # Local stores: keep artifacts beside the database, not in the current folder.
            mlflow.create_experiment(experiment, artifact_location=root)
        exp = mlflow.set_experiment(experiment)
        if EXPERIMENT_KIND_TAG not in exp.tags:
            client().set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
        run = client().create_run(exp.experiment_id, run_name=run_name or None, tags=ours)
    except Exception as exc:  # noqa: BLE001
        raise TrackingError(f"MLflow at {env.text('MLFLOW_TRACKING_URI')}: {exc}") from None
    return run.info.run_id


def find_pipeline_run(experiment: str, kfp_run_id: str) -> str:
    """Id of the parent run tagged with this KFP run id ("" when there is none).

    ``experiment`` "" searches every experiment (cached tasks know no experiment: it is no
    input of theirs), page by page, newest experiments first.
    """
    if not enabled():
        return ""
    where = f"tags.`kfp.run_id` = '{kfp_run_id}' and tags.`qlora.role` = 'pipeline'"
    if plugin.experiment_id() or experiment:
        if plugin.experiment_id():  # the backend chose the experiment
            ids = [plugin.experiment_id()]
        else:
            exp = client().get_experiment_by_name(experiment)
            ids = [exp.experiment_id] if exp else []
        found = client().search_runs(ids, max_results=1, filter_string=where) if ids else []
    else:
        found, token = [], None
        while not found:
            page = client().search_experiments(
                max_results=EXPERIMENTS_PAGE, order_by=["last_update_time DESC"], page_token=token
            )
            if page:
                ids = [e.experiment_id for e in page]
                found = client().search_runs(ids, max_results=1, filter_string=where)
            token = page.token
            if not token:
                break
    # Under the plugin a task may look before start-tracking tagged the backend's parent run.
    return found[0].info.run_id if found else plugin.find_root(kfp_run_id)


def close_pipeline_run(run_id: str, outcome: str, error: str = "", kfp_state: str = "") -> None:
    """Close a parent run: FINISHED, FAILED or KILLED by ``outcome`` (``tracking.outcome``),
    with the runner's own word and the failure reason as tags."""
    from qlora_kfp.tracking.outcome import MLFLOW_STATUS

    c = client()
    c.set_tag(run_id, "kfp.status", outcome)
    if kfp_state:
        c.set_tag(run_id, "kfp.state", kfp_state)
    if error:
        c.set_tag(run_id, "failure_reason", error[:5000])
    if plugin.task_run():
        # The backend's parent run: its API server closes it when the run ends (and would
        # reopen or re-close ours); apiserver ReportWorkflowResource in proposal 12862.
        log.info("the KFP backend closes MLflow run %s when the pipeline run ends", run_id)
        return
    c.set_terminated(run_id, status=MLFLOW_STATUS[outcome])
