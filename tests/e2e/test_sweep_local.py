"""qlora_sweep through kfp.local: one prepare/quantize, a ParallelFor of trials, the best one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]
GRID = [
    {
        "lora_r": 4,
        "lora_alpha": 8,
        "learning_rate": 5e-3,
        "target_modules": "q_proj,v_proj",
        "use_dora": False,
        "use_rslora": False,
    },
    {
        "lora_r": 8,
        "lora_alpha": 16,
        "learning_rate": 5e-3,
        "target_modules": "all-linear",
        "use_dora": True,
        "use_rslora": True,
    },
]


def test_sweep_trains_each_trial_and_picks_the_lowest_eval_loss(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from qlora_kfp.pipelines.qlora_sweep import qlora_sweep

    from qlora_kfp.app import local_runner
    from qlora_kfp.app.demo import make_demo_assets

    for k in [k for k in os.environ if k.startswith(("MLFLOW_", "QLORA_KFP_"))]:
        monkeypatch.delenv(k)
    local_runner.local_tracking_env(tmp_path)
    assets = make_demo_assets(tmp_path / "demo")
    run_dir = local_runner.run_pipeline(
        qlora_sweep,
        dict(
            **assets,
            lora_grid=GRID,
            max_seq_length=64,
            eval_fraction=0.15,
            eval_rows=0,
            lora_dropout=0.0,
            num_epochs=1.0,  # what is asserted (the lowest loss wins) needs no convergence
            batch_size=8,
            num_generations=2,
            max_new_tokens=4,
        ),
        tmp_path,
    )
    losses = [
        json.loads(
            (
                Path(run_dir) / f"for-loop-2-iteration-{i}" / "evaluate" / "executor_output.json"
            ).read_text()
        )["parameterValues"]["Output"]
        for i in range(len(GRID))
    ]
    best = json.loads((Path(run_dir) / "pick-best-trial" / "executor_output.json").read_text())
    best = best["parameterValues"]["Output"]
    assert best["trial"] == losses.index(min(losses)) and best["eval_loss"] == min(losses)
    for i, trial in enumerate(GRID):
        cfg = json.loads(
            (
                Path(run_dir)
                / f"for-loop-2-iteration-{i}"
                / "train"
                / "adapter"
                / "adapter_config.json"
            ).read_text()
        )
        assert cfg["r"] == trial["lora_r"] and cfg["use_dora"] == trial["use_dora"]

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("qlora-sweep")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("qlora.role") == "pipeline")
    trains = [
        r
        for r in runs
        if r.data.tags.get("stage") == "train"
        and r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    ]
    assert sorted(r.data.params["lora_r"] for r in trains) == ["4", "8"]
    assert json.loads(parent.data.tags["best_trial"])["lora_r"] == best["lora_r"]
    # Each trial is its own named run; the parent carries no one trial's settings or curve.
    from qlora_kfp.tasks.context import trial_label

    assert sorted(r.info.run_name for r in trains) == sorted(
        f"train {trial_label(g)}" for g in GRID
    )
    assert "lora_r" not in parent.data.params and "loss" not in parent.data.metrics
    assert parent.data.tags["best_trial.name"] == best["trial_name"]
