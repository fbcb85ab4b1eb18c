"""The whole qlora_finetune pipeline through kfp.local, as `make run` runs it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from support import NESTED_STAGE_RUNS

from qlora_kfp.storage.manifest import verify

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "QLORA_KFP_"))}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "qlora_kfp.app.cli",
            "run",
            "--workdir",
            str(workdir),
            "--run_name",
            "e2e",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = Path(json.loads(proc.stdout[proc.stdout.rindex("{") :])["run_dir"])
    return workdir, run_dir, proc.stdout


def metrics_of(run_dir: Path, task: str) -> dict:
    out = json.loads((run_dir / task / "executor_output.json").read_text())
    return out["artifacts"]["metrics"]["artifacts"][0]["metadata"]


def test_every_stage_wrote_a_verified_artifact(demo_run):
    _, run_dir, _ = demo_run
    for task, name, kind in [
        ("prepare-dataset", "dataset", "dataset"),
        ("quantize", "quantized_model", "quantized-model"),
        ("train", "adapter", "adapter"),
        ("evaluate", "evaluation", "evaluation"),
        ("merge", "merged_model", "merged-model"),
    ]:
        verify(run_dir / task / name, kind)
    assert (run_dir / "train" / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "merge" / "merged_model" / "model.safetensors").is_file()
    assert "<img src='data:image/png;base64," in (run_dir / "train" / "loss_curve").read_text()


def test_tuned_beats_base_and_learns_the_task(demo_run):
    _, run_dir, stdout = demo_run
    ev = metrics_of(run_dir, "evaluate")
    assert ev["tuned_eval_loss"] < 0.2 * ev["base_eval_loss"]
    assert ev["tuned_exact_match"] >= 0.5 > ev["base_exact_match"]
    assert metrics_of(run_dir, "merge")["merge_max_abs_diff"] <= 1e-3
    assert metrics_of(run_dir, "prepare-dataset")["eval_rows"] == 36
    assert "exact match" in stdout and "merge check" in stdout  # the printed summary
    assert metrics_of(run_dir, "train")["stage_seconds"] > 0  # the task's own cost, in KFP
    assert re.search(r"\ntrain +\d+\.\d\d +- +\d+\.\d\d\n", stdout)  # the printed cost table


def test_mlflow_has_one_parent_run_with_nested_stage_runs(demo_run):
    workdir, _, _ = demo_run
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("qlora-finetune")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    children = {
        r.data.tags["stage"]: r
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert set(children) == NESTED_STAGE_RUNS
    assert parent.data.params["lora_r"] == "16" and parent.data.params["learning_rate"] == "0.005"
    assert parent.data.metrics["tuned_exact_match"] >= 0.5
    history = client.get_metric_history(children["train"].info.run_id, "loss")
    assert len(history) > 10 and history[-1].value < history[0].value
    arts = {a.path for a in client.list_artifacts(children["train"].info.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in arts
    # Every model stage records its wall time and peak memory; the parent, one name per stage.
    for name in ("prepare-dataset", "quantize", "train", "evaluate", "merge"):
        usage = children[name].data.metrics
        assert usage["stage_seconds"] > 0 and usage["stage_peak_rss_gib"] > 0.1, name
        assert parent.data.metrics[f"{name}.stage_seconds"] == usage["stage_seconds"], name
    train = children["train"].data.metrics
    assert train["stage_seconds"] >= train["train_runtime_s"]


def test_exit_handler_wrote_the_run_report(demo_run):
    _, run_dir, _ = demo_run
    text = (run_dir / "finish-tracking" / "report").read_text()
    assert ": SUCCEEDED" in text and "| exact match |" in text
    assert "![loss curve](data:image/png;base64," in text


def test_the_last_lines_give_the_mlflow_link_the_registry_result_and_the_next_step(demo_run):
    _, _, stdout = demo_run
    human = stdout[: stdout.rindex("{")].rstrip().splitlines()  # the JSON line is for scripts
    assert human[-5] == "--- what next ---"
    assert human[-4].startswith("MLflow:    experiment qlora-finetune, run e2e")
    assert "?workflowType=machine_learning" in human[-3] and "make mlflow-ui" in human[-3]
    assert human[-2] == "registry:  tiny-llama-antonyms version 1, now its champion"
    assert human[-1].startswith("next:")
