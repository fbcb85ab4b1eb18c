"""``qlora-kfp run``'s argument handling, without running a pipeline."""

from __future__ import annotations

import argparse

import pytest

from qlora_kfp.app import cli, local_runner


@pytest.fixture
def no_pipeline(monkeypatch):
    """Any pipeline run fails the test: these cases must stop before one starts."""

    def ran(*a, **kw):
        raise AssertionError("a pipeline ran")

    monkeypatch.setattr(local_runner, "demo", ran)
    monkeypatch.setattr(local_runner, "run_pipeline", ran)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.mark.parametrize(
    "given, missing",
    [(["--data_source", "mine.jsonl"], "base_model"), (["--base_model", "org/m"], "data_source")],
)
def test_one_source_without_the_other_is_a_one_line_error(
    no_pipeline, tmp_path, capsys, given, missing
):
    assert cli.main(["run", "--workdir", str(tmp_path), *given]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"needs --{missing} too" in err
    assert "demo" in err


def test_a_params_file_with_one_source_is_the_same_error(no_pipeline, tmp_path, capsys):
    params = tmp_path / "p.yaml"
    params.write_text("data_source: mine.jsonl\n")
    assert cli.main(["run", "--workdir", str(tmp_path), "--params_file", str(params)]) == 2
    assert "--data_source needs --base_model too" in capsys.readouterr().err


@pytest.fixture
def captured(monkeypatch):
    """Stand-ins for the demo's assets and the pipeline run: what would run, and with what."""
    seen: dict = {}

    def run_pipeline(pipeline, params, workdir, verbose=False):
        seen.update(pipeline=pipeline.pipeline_func.__name__, params=params)
        return workdir

    monkeypatch.setattr(local_runner, "run_pipeline", run_pipeline)
    monkeypatch.setattr(
        local_runner, "make_demo_assets", lambda root: {"data_source": "d.jsonl", "base_model": "m"}
    )
    monkeypatch.setattr(local_runner, "collect", lambda run_dir: {})
    for k in ("MLFLOW_TRACKING_URI", "QLORA_KFP_MLFLOW_ARTIFACT_ROOT"):
        monkeypatch.delenv(k, raising=False)
    return seen


def test_the_demo_trains_with_the_settings_of_examples_demo_yaml(captured, tmp_path):
    import yaml

    shown = yaml.safe_load(local_runner.DEMO_PARAMS_FILE.read_text())
    assert shown["learning_rate"] == 5e-3 and shown["num_epochs"] == 20.0
    assert cli.main(["run", "--workdir", str(tmp_path), "--lora_r", "8"]) == 0
    assert captured["pipeline"] == "qlora_finetune"
    assert captured["params"] == {
        **shown,
        "data_source": "d.jsonl",
        "base_model": "m",
        "run_name": captured["params"]["run_name"],
        "lora_r": 8,  # a flag overrides the file
    }


def test_the_demo_settings_file_is_the_one_read(captured, tmp_path, monkeypatch):
    mine = tmp_path / "demo.yaml"
    mine.write_text("learning_rate: 0.0123\n")
    monkeypatch.setattr(local_runner, "DEMO_PARAMS_FILE", mine)
    assert cli.main(["run", "--workdir", str(tmp_path)]) == 0
    assert captured["params"]["learning_rate"] == 0.0123
    assert "num_epochs" not in captured["params"]


def test_a_local_sweep_runs_qlora_sweep_with_its_grid(captured, tmp_path):
    from qlora_kfp.app.local_runner import DEMO_PARAMS_FILE

    grid = DEMO_PARAMS_FILE.parent / "demo_sweep.yaml"
    args = ["run", "--workdir", str(tmp_path), "--pipeline", "qlora_sweep"]
    assert cli.main([*args, "--params_file", str(grid)]) == 0
    assert captured["pipeline"] == "qlora_sweep"
    assert [t["lora_r"] for t in captured["params"]["lora_grid"]] == [4, 16]
    assert captured["params"]["learning_rate"] == 5e-3  # the demo's settings under the grid


def test_a_parameter_of_the_other_pipeline_is_a_one_line_error(no_pipeline, tmp_path, capsys):
    args = ["run", "--workdir", str(tmp_path), "--pipeline", "qlora_sweep", "--force_retrain"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown parameter 'force_retrain'" in err
    args = ["run", "--workdir", str(tmp_path), "--lora_grid", "[]"]
    assert cli.main(args) == 2
    assert "unknown parameter 'lora_grid'" in capsys.readouterr().err


def test_make_run_passes_params_and_args(tmp_path):
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        ["make", "-n", "-C", str(root), "run", "PARAMS=p.yaml", "ARGS=--lora_r 8"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    run = [line for line in out.splitlines() if "qlora-kfp run " in line]
    assert run and run[-1].endswith("--params_file p.yaml --lora_r 8")


def test_the_sweep_summary_names_the_best_trial(capsys):
    from qlora_kfp.app.summary import print_summary

    best = {"trial": 1, "trial_name": "trial-ab12", "eval_loss": 0.25, "lora_r": 16}
    tasks = {"pick-best-trial": {"outputs": {"parameterValues": {"Output": best}}}}
    print_summary({"run_dir": "/r", "tasks": tasks}, "qlora_sweep")
    out = capsys.readouterr().out
    assert "=== qlora_sweep: local run finished ===" in out
    assert "best trial: trial-ab12 (eval loss 0.2500)" in out and '{"lora_r": 16}' in out


def test_the_readme_shows_the_demo_settings_as_they_are():
    import re
    from pathlib import Path

    import yaml

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = re.search(r"examples/demo\.yaml\)?:\n\n```yaml\n(.*?)```", readme, re.S)
    assert block, "README shows examples/demo.yaml in a yaml block"
    shown = yaml.safe_load(block.group(1))
    assert shown == yaml.safe_load(local_runner.DEMO_PARAMS_FILE.read_text())


def test_run_help_lists_the_sweep_grid_with_its_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--lora_grid LORA_GRID Trials: each entry sets train parameters" in text
    assert "[qlora_sweep only]" in text and "[qlora_finetune only]" in text
    assert "(pipeline default: qlora_finetune: qlora-finetune; qlora_sweep: qlora-sweep)" in text


def _registered(version: int, promoted: bool) -> dict:
    meta = {"registered_version": float(version), "promoted_to_champion": float(promoted)}
    return {
        "register-model": {
            "outputs": {"artifacts": {"metrics": {"artifacts": [{"metadata": meta}]}}}
        }
    }


@pytest.mark.parametrize(
    "tasks, registry",
    [
        (_registered(1, True), "registry:  tiny-llama-antonyms version 1, now its champion"),
        (_registered(3, False), "registry:  tiny-llama-antonyms version 3, challenger"),
        ({}, "registry:  tiny-llama-antonyms: unchanged (no model was registered)"),
    ],
    ids=["promoted", "not-promoted", "nothing-registered"],
)
def test_the_last_lines_say_where_to_look_what_the_registry_holds_and_what_next(
    capsys, monkeypatch, tasks, registry
):
    from qlora_kfp.app import summary

    monkeypatch.setattr(summary, "mlflow_link", lambda *a: "http://mlflow/#/experiments/1/runs")
    params = {
        "base_model": "/w/demo/tiny-llama",
        "data_source": "/w/demo/antonyms.jsonl",
        "run_name": "demo-20261205-1508",
        "mlflow_experiment": "qlora-finetune",
    }
    result = {"run_dir": "/r", "params": params, "tracking_uri": "sqlite:///m.db", "tasks": tasks}
    summary.print_summary(result)
    last = capsys.readouterr().out.rstrip().splitlines()[-5:]
    assert last[0] == "--- what next ---"
    assert last[1] == "MLflow:    experiment qlora-finetune, run demo-20261205-1508"
    assert last[2].strip() == "http://mlflow/#/experiments/1/runs"
    assert last[3].startswith(registry)
    assert (
        last[4].startswith("next:") and "make mlflow-ui" in last[4] and "--data_source" in last[4]
    )


def _commands() -> list[str]:
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(sub.choices)


@pytest.mark.parametrize("command", _commands())
def test_every_command_prints_its_help(command, capsys):
    """A help text is printed as written: argparse reads ``%`` as a format, so a help saying
    "80% of what the host can give" (merge_memory_gib) broke ``run --help`` and ``merge --help``."""
    with pytest.raises(SystemExit) as stop:
        cli.main([command, "--help"])
    assert stop.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    if command in ("run", "merge"):
        assert "80% of what the host" in out
