"""A KFP retry of a stage that failed for good stops at once; a transient failure is retried.

The backend retries a failed GPU task whatever the error, minutes later; from 2.17 each attempt
has ``KFP_RETRY_INDEX`` (kubeflow/pipelines backend/src/v2/compiler/argocompiler/container.go).
"""

from __future__ import annotations

import pytest

from qlora_kfp import configs
from qlora_kfp.errors import ConfigError, SourceError, TrainingDivergedError
from qlora_kfp.tasks.context import RETRY_INDEX_ENV, stage
from qlora_kfp.tracking import parent_run


def attempt(parent: str, error: Exception | None, trial: dict | None = None) -> bool:
    """One attempt of the train stage; returns whether its body ran."""
    ran = []
    args = {"mlflow_parent_run_id": parent, **({"config_overrides": trial} if trial else {})}
    try:
        with stage("train", configs.TrainConfig, args):
            ran.append(True)
            if error is not None:
                raise error
    except SystemExit:
        pass
    return bool(ran)


@pytest.mark.parametrize(
    "error",
    [ConfigError("target_modules ['q'] are not in the model"), TrainingDivergedError("nan")],
    ids=["bad-setting", "diverged"],
)
def test_a_retry_after_a_permanent_failure_stops_before_any_work(local_mlflow, monkeypatch, error):
    parent = parent_run.start_pipeline_run("exp", "r", {"kfp.run_id": "run-1"})
    monkeypatch.setenv(RETRY_INDEX_ENV, "0")
    assert attempt(parent, error)
    monkeypatch.setenv(RETRY_INDEX_ENV, "1")
    retried = stage("train", configs.TrainConfig, {"mlflow_parent_run_id": parent})
    with pytest.raises(SystemExit, match=r"not retried \(attempt 2\).*retry cannot fix"), retried:
        pytest.fail("the retried stage started its work")


def test_a_transient_failure_is_retried(local_mlflow, monkeypatch):
    parent = parent_run.start_pipeline_run("exp", "r", {"kfp.run_id": "run-1"})
    monkeypatch.setenv(RETRY_INDEX_ENV, "0")
    assert attempt(parent, SourceError("s3://b/model: connection reset"))
    monkeypatch.setenv(RETRY_INDEX_ENV, "1")
    assert attempt(parent, None)


def test_a_first_attempt_always_runs(local_mlflow, monkeypatch):
    """A user's retry of the whole run (or a backend before 2.17) starts at attempt 0."""
    parent = parent_run.start_pipeline_run("exp", "r", {"kfp.run_id": "run-1"})
    assert attempt(parent, ConfigError("bad"))
    monkeypatch.setenv(RETRY_INDEX_ENV, "0")
    assert attempt(parent, None)


def test_one_trials_permanent_failure_does_not_stop_another_trial(local_mlflow, monkeypatch):
    parent = parent_run.start_pipeline_run("exp", "r", {"kfp.run_id": "run-1"})
    assert attempt(parent, ConfigError("bad"), trial={"lora_r": 8})
    monkeypatch.setenv(RETRY_INDEX_ENV, "1")
    assert attempt(parent, None, trial={"lora_r": 16})
    assert not attempt(parent, None, trial={"lora_r": 8})
