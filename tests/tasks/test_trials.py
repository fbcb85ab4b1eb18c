"""Sweep trials share nothing: each has its own S3 prefix, checkpoints and named MLflow run,
preflight checks every trial, and the parent run shows the grid and the winner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlora_kfp import configs
from qlora_kfp.tasks import context
from qlora_kfp.tasks.bookkeeping_tasks import pick_best_trial, preflight
from qlora_kfp.tasks.context import RunContext, stage
from qlora_kfp.tracking import parent_run

SMALL = {"lora_r": 8, "lora_alpha": 16, "learning_rate": 2e-4}
LARGE = {"lora_r": 64, "lora_alpha": 16, "learning_rate": 1e-4, "use_rslora": True}


@pytest.fixture
def artifact_store(monkeypatch):
    monkeypatch.setenv(context.ARTIFACT_URI_ENV, "s3://bucket/runs")
    monkeypatch.setenv(context.RUN_ID_ENV, "run-9")


def test_each_trial_mirrors_and_publishes_under_its_own_prefix(artifact_store):
    def uri(entry: dict, name: str) -> str:
        return RunContext.from_args({"config_overrides": entry}).artifact_uri(name)

    small, large = uri(SMALL, "train-checkpoints"), uri(LARGE, "train-checkpoints")
    assert small != large and small.startswith("s3://bucket/runs/run-9/trial-")
    assert uri(SMALL, "adapter") != uri(LARGE, "adapter")
    # The same grid entry is the same trial, whatever the key order (a retried pod resumes).
    assert uri(dict(reversed(list(SMALL.items()))), "train-checkpoints") == small
    # Outside a sweep the prefix has no trial part.
    assert RunContext.from_args({}).artifact_uri("adapter") == "s3://bucket/runs/run-9/adapter"


def test_the_pods_run_id_wins_over_the_argument(artifact_store):
    ctx = RunContext.from_args({"kfp_run_id": "local-runner-number"})
    assert ctx.kfp_run_id == "run-9"


def test_a_trials_stage_run_is_named_after_it_and_keeps_to_itself(local_mlflow):
    parent = parent_run.start_pipeline_run("sweep", "r", {"kfp.run_id": "run-9"})
    args = {"mlflow_parent_run_id": parent, "config_overrides": LARGE, **LARGE}
    with stage("train", configs.TrainConfig, args) as (cfg, run, ctx):
        assert cfg.lora_r == 64
        run.metrics({"loss": 1.5}, step=1)
    found = parent_run.client().search_runs(
        [parent_run.client().get_run(parent).info.experiment_id]
    )
    train = next(r for r in found if r.data.tags.get("stage") == "train")
    assert train.info.run_name == f"train {context.trial_label(LARGE)}"
    assert json.loads(train.data.tags["trial.params"]) == LARGE
    assert train.data.params["lora_r"] == "64" and train.data.metrics["loss"] == 1.5
    # Nothing of one trial lands on the parent: no settings, no interleaved histories.
    top = parent_run.client().get_run(parent).data
    assert "lora_r" not in top.params
    assert not any(k == "loss" or k.startswith("train.") for k in top.metrics)


def test_the_parent_shows_the_grid_and_the_winner(local_mlflow):
    parent = parent_run.start_pipeline_run("sweep", "r", {"kfp.run_id": "run-9"})
    best = pick_best_trial(
        {"lora_grid": [SMALL, LARGE], "eval_losses": [2.0, 1.25], "mlflow_parent_run_id": parent}
    )
    assert best["trial"] == 1 and best["trial_name"] == context.trial_label(LARGE)
    top = parent_run.client().get_run(parent).data
    assert top.tags["best_trial.name"] == best["trial_name"]
    assert json.loads(top.tags["sweep.grid"]) == [SMALL, LARGE]
    files = {a.path for a in parent_run.client().list_artifacts(parent, "sweep")}
    files |= {a.path for a in parent_run.client().list_artifacts(parent, "plots")}
    assert {"sweep/trials.json", "plots/sweep_trials.png"} <= files
    path = parent_run.client().download_artifacts(parent, "sweep/trials.json", str(local_mlflow))
    table = json.loads(Path(path).read_text())
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert [(r["trial"], r["eval_loss"]) for r in rows] == [
        (context.trial_label(SMALL), 2.0),
        (context.trial_label(LARGE), 1.25),
    ]


@pytest.mark.parametrize(
    "grid,message",
    [
        ([SMALL, {"lora_r": 0}], "lora_r=0 is invalid"),
        ([SMALL, {"lora_rank": 8}], "did you mean lora_r"),
        ([SMALL, LARGE, dict(SMALL)], r"lora_grid\[2\] repeats lora_grid\[0\]"),
        ([SMALL, {"gpu_memory_gib": 0.01}], r"the GPU has 0.01 GiB"),
    ],
    ids=["invalid-trial", "misspelt-key", "repeated-trial", "trial-on-a-smaller-gpu"],
)
def test_preflight_refuses_a_bad_grid_before_any_gpu_task(demo_assets, grid, message, capsys):
    args = {
        **{p.name: p.default for p in configs.params_of(*configs.ALL_CONFIGS) if not p.required},
        **demo_assets,
        "lora_grid": grid,
    }
    with pytest.raises(SystemExit, match=message):
        preflight(args)


def test_a_trial_keeps_its_name_when_json_makes_its_integers_floats():
    """KFP hands a loop item over as JSON (8 becomes 8.0) while pick-best-trial may see 8."""
    as_json = {"lora_r": 8.0, "lora_alpha": 16.0, "learning_rate": 2e-4}
    assert context.trial_label(as_json) == context.trial_label(SMALL)
    assert context.trial_label({**SMALL, "lora_r": 9}) != context.trial_label(SMALL)


def test_a_trials_grid_entry_overrides_every_stage_and_a_typo_is_one_line(capsys):
    """The entry reaches train and evaluate; an unknown key names the closest parameter."""
    entry = {"compute_dtype": "float32", "lora_r": 8}
    with stage("evaluate", configs.EvaluateConfig, {"config_overrides": entry}) as (cfg, _, ctx):
        assert cfg.compute_dtype == "float32" and ctx.trial == context.trial_label(entry)
    typo = stage("train", configs.TrainConfig, {"config_overrides": {"lora_rank": 8}})
    with (
        pytest.raises(SystemExit, match=r"^train failed: .*'lora_rank'; did you mean lora_r"),
        typo,
    ):
        pytest.fail("a misspelt grid entry must not start the stage")


def test_a_failing_chart_or_cleanup_does_not_fail_the_finished_sweep(
    local_mlflow, artifact_store, monkeypatch
):
    from qlora_kfp.storage import s3
    from qlora_kfp.tracking import plots

    def broken(*a, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(plots, "trial_bars", broken)
    monkeypatch.setattr(s3, "delete_prefix", broken)
    parent = parent_run.start_pipeline_run("sweep", "r", {"kfp.run_id": "run-9"})
    best = pick_best_trial(
        {"lora_grid": [SMALL, LARGE], "eval_losses": [2.0, 1.25], "mlflow_parent_run_id": parent}
    )
    assert best["trial_name"] == context.trial_label(LARGE)
