"""The link `make run` prints opens the experiment's runs table in MLflow's model-training
view, checked in headless Chromium against a real `mlflow server`: MLflow 3.17 opens an
experiment in the GenAI view by default, whatever the experiment's tags say."""

from __future__ import annotations

import pytest
from support.browser import page_text

pytestmark = pytest.mark.integration


def test_the_printed_link_opens_the_runs_table(services, monkeypatch, tmp_path):
    import mlflow

    from qlora_kfp.app.summary import mlflow_link

    monkeypatch.setenv("MLFLOW_TRACKING_URI", services.tracking_uri)
    exp = mlflow.set_experiment("view-check")
    with mlflow.start_run(run_name="the-parent-run", experiment_id=exp.experiment_id):
        mlflow.log_metric("eval_loss", 0.5)
    link = mlflow_link(
        {"tracking_uri": services.tracking_uri, "params": {"mlflow_experiment": "view-check"}}
    )
    assert link and link.startswith(services.tracking_uri)
    text = page_text(link, ["the-parent-run", "Model registry"], tmp_path / "runs.png")
    assert "Runs" in text and "Traces" in text
    assert "Observability" not in text  # the GenAI view's navigation


def test_a_local_store_s_link_points_at_make_mlflow_ui(local_mlflow):
    """`make run` without a tracking server writes to a SQLite store: its link is the
    experiment on the UI `make mlflow-ui` serves, and says to start it."""
    import os

    import mlflow

    from qlora_kfp.app.summary import LOCAL_UI, mlflow_link

    exp = mlflow.set_experiment("qlora-finetune")
    link = mlflow_link({"tracking_uri": os.environ["MLFLOW_TRACKING_URI"], "params": {}})
    assert link == (
        f"{LOCAL_UI}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"
        "   (after: make mlflow-ui)"
    )
