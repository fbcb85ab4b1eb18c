"""Under the KFP backend's MLflow plugin the stages log into the runs the backend made.

``FakeMlflowPlugin`` does what a 2.17 backend with the plugin on does around each task, against
a real MLflow store: the API server opens the parent run tagged ``kfp.pipeline_run_id``
(backend/src/apiserver/plugins/mlflow/run_start.go), the driver opens a nested run per task and
sets ``MLFLOW_RUN_ID``/``MLFLOW_EXPERIMENT_ID`` (backend/src/v2/common/plugins/mlflow/handler.go
OnTaskStart, RetrieveUserContainerEnvVars), the launcher logs the task's inputs as JSON params
and closes the nested run (handler.go OnTaskEnd, mapToParams: MLflow refuses a param whose
value changes, so a clash fails here as it fails there).
"""

from __future__ import annotations

import contextlib
import json
from types import SimpleNamespace

import pytest

from qlora_kfp import configs
from qlora_kfp.tasks import bookkeeping_tasks
from qlora_kfp.tasks.context import RUN_ID_ENV, stage
from qlora_kfp.tracking import parent_run


class FakeMlflowPlugin:
    def __init__(self, monkeypatch, experiment: str, kfp_run_id: str):
        self.mp, self.kfp_run_id = monkeypatch, kfp_run_id
        c = parent_run.client()
        self.experiment_id = c.create_experiment(experiment)
        self.root = c.create_run(
            self.experiment_id,
            run_name="pipeline-run",
            tags={"kfp.pipeline_run_id": kfp_run_id, "kfp.pipeline_run_url": "http://kfp/#/r"},
        ).info.run_id
        monkeypatch.setenv(RUN_ID_ENV, kfp_run_id)

    @contextlib.contextmanager
    def task(self, name: str, inputs: dict, parent: str = ""):
        c = parent_run.client()
        nested = c.create_run(
            self.experiment_id, run_name=name, tags={"mlflow.parentRunId": parent or self.root}
        ).info.run_id
        self.mp.setenv("MLFLOW_RUN_ID", nested)
        self.mp.setenv("MLFLOW_EXPERIMENT_ID", self.experiment_id)
        status = "FINISHED"
        try:
            yield nested
        except SystemExit:
            status = "FAILED"
        finally:
            from mlflow.entities import Param

            params = [Param(k, json.dumps(v)) for k, v in inputs.items()]
            c.log_batch(nested, params=params)  # raises if a stage logged a clashing value
            c.set_terminated(nested, status)
            self.mp.delenv("MLFLOW_RUN_ID")


def _defaults() -> dict:
    return {p.name: p.default for p in configs.params_of(*configs.ALL_CONFIGS) if not p.required}


def test_the_stages_log_into_the_backends_runs_and_open_no_second_tree(local_mlflow, monkeypatch):
    plugin = FakeMlflowPlugin(monkeypatch, "kfp-default", "run-uuid-1")
    args = {**_defaults(), "base_model": "m", "data_source": "d", "kfp_run_id": "run-uuid-1"}
    with plugin.task("start-tracking", {"mlflow_experiment": "qlora-finetune"}):
        parent = bookkeeping_tasks.start_tracking(args)
    assert parent == plugin.root
    train_inputs = {k: args[k] for k in ("lora_r", "learning_rate", "optimizer", "packing")}
    train_args = {**args, "mlflow_parent_run_id": parent}
    with (
        plugin.task("train", train_inputs) as train_run,
        stage("train", configs.TrainConfig, train_args) as (_, run, _),
    ):
        assert run.run_id == train_run
        run.metrics({"loss": 0.5}, step=3)
    with plugin.task("finish-tracking", {}):
        bookkeeping_tasks.finish_tracking(
            {
                **args,
                "status": SimpleNamespace(state="COMPLETE", error_message=None),
                "report": SimpleNamespace(path=str(local_mlflow / "report.md")),
            }
        )

    c = parent_run.client()
    everything = c.search_runs([plugin.experiment_id])
    assert len(everything) == 4  # the backend's parent and its three task runs: nothing else
    assert not [e for e in c.search_experiments() if e.name == "qlora-finetune"]
    root = c.get_run(plugin.root)
    assert (
        root.data.tags["qlora.role"] == "pipeline" and root.data.tags["kfp.run_id"] == "run-uuid-1"
    )
    assert root.data.params["lora_r"] == "16"  # the pipeline's settings on the parent
    assert root.data.tags["kfp.status"] == "SUCCEEDED"
    assert root.info.status == "RUNNING"  # closing the parent is the backend's job
    train = c.get_run(train_run)
    assert train.data.tags["stage"] == "train" and train.data.metrics["loss"] == 0.5
    assert train.data.params["optimizer"] == '"auto"'  # the launcher's params, unclashed


def test_a_failing_stage_under_the_plugin_says_why_on_its_task_run(local_mlflow, monkeypatch):
    plugin = FakeMlflowPlugin(monkeypatch, "kfp-default", "run-uuid-2")
    bad = {"lora_r": 0, "kfp_run_id": "run-uuid-2"}
    with plugin.task("train", {}) as train_run, stage("train", configs.TrainConfig, bad):
        pytest.fail("an invalid config must not start the stage")
    run = parent_run.client().get_run(train_run)
    assert run.info.status == "FAILED"
    assert "lora_r=0 is invalid" in run.data.tags["failure_reason"]


def test_a_trial_that_failed_for_good_is_not_retried_under_the_plugin(local_mlflow, monkeypatch):
    """Under the plugin a trial's task run hangs under the loop's run, not the parent (the
    driver's loop -> iteration nesting): the retry guard still finds the earlier attempt."""
    from qlora_kfp.errors import ConfigError
    from qlora_kfp.tasks.context import RETRY_INDEX_ENV

    plugin = FakeMlflowPlugin(monkeypatch, "kfp-default", "run-uuid-3")
    args = {**_defaults(), "base_model": "m", "data_source": "d", "kfp_run_id": "run-uuid-3"}
    with plugin.task("start-tracking", {}):
        bookkeeping_tasks.start_tracking(args)
    loop = (
        parent_run.client()
        .create_run(
            plugin.experiment_id, run_name="trials", tags={"mlflow.parentRunId": plugin.root}
        )
        .info.run_id
    )
    trial = {"lora_r": 8}
    train_args = {"kfp_run_id": "run-uuid-3", "config_overrides": trial, **trial}
    monkeypatch.setenv(RETRY_INDEX_ENV, "0")
    with plugin.task("train", {}, parent=loop), stage("train", configs.TrainConfig, train_args):
        raise ConfigError("target_modules ['q'] are not in the model")
    monkeypatch.setenv(RETRY_INDEX_ENV, "1")
    ran = []
    with (
        plugin.task("train", {}, parent=loop) as retry,
        stage("train", configs.TrainConfig, train_args),
    ):
        ran.append(True)
    assert not ran
    assert (
        "not retried (attempt 2)" in parent_run.client().get_run(retry).data.tags["failure_reason"]
    )
