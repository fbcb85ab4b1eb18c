"""What a stage's MLflow run records, and what it never does to the runs around it."""

from __future__ import annotations

import pytest

from qlora_kfp.tracking import parent_run


def test_prepare_dataset_leaves_the_parent_run_running(local_mlflow, demo_assets, tmp_path):
    """The dataset is logged as an input of the stage and parent runs without ending either:
    a parent reading FINISHED while the pipeline still trains misleads everyone watching."""
    from types import SimpleNamespace

    from qlora_kfp.tasks import stage_tasks

    parent = parent_run.start_pipeline_run("exp", "r", {"kfp.run_id": "run-4"})
    out = SimpleNamespace(path=str(tmp_path / "dataset"), metadata={})
    stage_tasks.prepare_dataset(
        {**demo_assets, "max_seq_length": 64, "dataset": out, "mlflow_parent_run_id": parent}
    )
    top = parent_run.client().get_run(parent)
    assert top.info.status == "RUNNING"
    assert [d.dataset.name for d in top.inputs.dataset_inputs] == ["train"]


def test_mlflow_failing_while_a_stage_fails_still_reports_the_stages_error(
    local_mlflow, monkeypatch
):
    from qlora_kfp import configs
    from qlora_kfp.errors import ConfigError
    from qlora_kfp.tasks.context import stage
    from qlora_kfp.tracking import stage_runs

    parent = parent_run.start_pipeline_run("exp", "r", {"kfp.run_id": "run-9"})
    real = stage_runs.client()

    class Down:
        def __getattr__(self, name):
            if name in ("set_tag", "set_terminated"):
                raise RuntimeError("MLflow is down")
            return getattr(real, name)

    failing = stage("train", configs.TrainConfig, {"mlflow_parent_run_id": parent})
    with pytest.raises(SystemExit, match=r"^train failed: target_modules \['q'\] are not"), failing:
        monkeypatch.setattr(stage_runs, "client", Down)
        raise ConfigError("target_modules ['q'] are not in the model")


def test_a_cached_task_finds_its_parent_run_in_any_experiment(local_mlflow, monkeypatch, caplog):
    """Cached tasks know only the run id: every experiment is searched, page by page (a
    tracking server holds more than one page of experiments)."""
    from qlora_kfp.tracking import stage_runs

    monkeypatch.setattr(parent_run, "EXPERIMENTS_PAGE", 2)
    parent = parent_run.start_pipeline_run("oldest", "r", {"kfp.run_id": "run-5"})
    for i in range(5):
        parent_run.client().create_experiment(f"newer-{i}")
    assert parent_run.find_pipeline_run("", "run-5") == parent
    with stage_runs.stage_run("", "prepare-dataset", "run-5") as run:
        assert run.parent_run_id == parent
    with caplog.at_level("WARNING"), stage_runs.stage_run("", "quantize", "run-unknown") as run:
        assert run.run_id == ""
    assert "no MLflow run is tagged kfp.run_id=run-unknown: quantize is not tracked" in caplog.text


def test_registering_kfps_own_artifact_says_what_readers_need(local_mlflow, caplog):
    """Without an artifact store of the user's, the version's source is KFP's own store."""
    from qlora_kfp.tasks import stage_tasks

    parent = parent_run.start_pipeline_run("exp", "r", {"kfp.run_id": "run-6"})
    uri = "s3://mlpipeline/v2/artifacts/qlora-finetune/run-6/merge/merged_model"
    with caplog.at_level("WARNING"):
        version = stage_tasks.register_model(
            {
                "base_model": "org/m",
                "data_source": "s3://data/sets/support-v2/",
                "merged_model_uri": uri,
                "dataset_digest": "d",
                "tuned_eval_loss": 0.5,
                "mlflow_parent_run_id": parent,
            }
        )
    assert parent_run.client().get_model_version("m-support-v2", version).source == uri
    assert "KFP's own copy of the merged model" in caplog.text


@pytest.mark.slow
def test_a_run_reusing_cached_tasks_shows_what_they_reported(local_mlflow, demo_assets, tmp_path):
    """On a KFP cache hit prepare-dataset and quantize run no pod: the next run's train task
    carries their stage runs' statistics, config and dataset input onto its own parent run,
    tagged with where they came from, and not their cost (it was not this run's)."""
    from types import SimpleNamespace

    from qlora_kfp.tasks import stage_tasks

    def artifact(name):
        return SimpleNamespace(path=str(tmp_path / name), metadata={})

    first = parent_run.start_pipeline_run("exp", "r1", {"kfp.run_id": "run-a"})
    common = {"mlflow_parent_run_id": first, "kfp_run_id": "run-a"}
    dataset, model = artifact("dataset"), artifact("model")
    stage_tasks.prepare_dataset({**demo_assets, **common, "max_seq_length": 64, "dataset": dataset})
    stage_tasks.quantize({**demo_assets, **common, "dataset": dataset, "quantized_model": model})
    made = parent_run.client().get_run(first)

    # KFP's cache hands the same artifacts, metadata included, to the next run.
    second = parent_run.start_pipeline_run("exp", "r2", {"kfp.run_id": "run-b"})
    small = dict(max_steps=1, batch_size=4, lora_r=8, logging_steps=1)
    stage_tasks.train(
        {
            **small,
            "mlflow_parent_run_id": second,
            "kfp_run_id": "run-b",
            "dataset": dataset,
            "quantized_model": model,
            "adapter": artifact("adapter"),
        }
    )
    got = parent_run.client().get_run(second)
    stage_cost = ("prepare-dataset.", "quantize.")
    want = {k: v for k, v in made.data.metrics.items() if not k.startswith(stage_cost)}
    assert "rows_read" in want and "compression_ratio" in want
    assert {k: got.data.metrics.get(k) for k in want} == want
    assert not any(k.startswith(stage_cost + ("stage_",)) for k in got.data.metrics)
    assert got.data.params["max_seq_length"] == "64"
    for stage, art in (("prepare-dataset", dataset), ("quantize", model)):
        assert got.data.tags[f"cached.{stage}"] == art.metadata["mlflow_run_id"]
        assert got.data.tags[f"cached.{stage}.kfp_run_id"] == "run-a"
    digests = [d.dataset.digest for d in made.inputs.dataset_inputs]
    assert digests and [d.dataset.digest for d in got.inputs.dataset_inputs] == digests
    # The run that made them logged them itself: nothing is carried over there.
    assert not any(k.startswith("cached.") for k in made.data.tags)
