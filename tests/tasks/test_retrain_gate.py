"""The retraining gate: a run trains unless the champion was made from exactly what it would
train on, and a run that trains nothing says why, how to force it, and which champion it reuses."""

from __future__ import annotations

import io
import json

import pytest

from qlora_kfp.tracking import parent_run

FINGERPRINT = json.dumps({"data": "file:d1", "model": "weights:m1", "code": "0.1.0+abc+img"})


def _args(parent: str, **changes) -> dict:
    return {
        "data_source": "data.jsonl",
        "base_model": "org/model",
        "dataset_digest": "digest-1",
        "cache_fingerprint": FINGERPRINT,
        "registered_model_name": "gate",
        "force_retrain": False,
        "mlflow_parent_run_id": parent,
        "kfp_run_id": "",
        **changes,
    }


def _decide(name: str, **changes) -> tuple[str, dict]:
    from qlora_kfp.tasks import bookkeeping_tasks

    parent = parent_run.start_pipeline_run("gate", name, {"kfp.run_id": name})
    word = bookkeeping_tasks.decide_training(_args(parent, **changes))
    return word, {"id": parent, **parent_run.client().get_run(parent).data.tags}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store for the module (a new SQLite store costs seconds of migrations)."""
    root = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("QLORA_KFP_MLFLOW_ARTIFACT_ROOT", (root / "art").as_uri())
        yield root


@pytest.fixture(scope="module")
def champion(store):
    """A first run that trains and registers its model: the champion."""
    from qlora_kfp.tasks import stage_tasks

    word, first = _decide("first")
    assert word == "train" and first["training_decision_reason"] == "no champion yet"
    merged = store / "merged"
    merged.mkdir()
    (merged / "config.json").write_text("{}")
    args = {
        **_args(first["id"]),
        "merged_model_uri": str(merged),
        "tuned_eval_loss": 0.5,
    }
    assert stage_tasks.register_model(args) == "1"
    return first["id"]


def test_nothing_changed_skips_and_the_run_says_which_champion_it_reuses(champion):
    word, tags = _decide("again", logging_steps=1, fused_lora=False)  # speed and logging only
    assert word == "skip"
    assert tags["qlora.reused_champion"] == champion
    assert tags["qlora.reused_champion_version"] == "gate/1"
    note = tags["mlflow.note.content"]
    assert note.startswith(f"No model trained: this run reuses champion gate/1 (run {champion})")
    assert "force_retrain=true" in note


@pytest.mark.parametrize(
    "change, named",
    [
        ({"learning_rate": 2e-3}, "learning_rate 0.0002 -> 0.002"),
        ({"lora_r": 8}, "lora_r 16 -> 8"),
        ({"num_epochs": 3.0}, "num_epochs 1.0 -> 3.0"),
        ({"quant_type": "fp4"}, "quant_type 'nf4' -> 'fp4'"),
        ({"max_new_tokens": 8}, "max_new_tokens 64 -> 8"),
        ({"dataset_digest": "digest-2"}, "dataset digest-1 -> digest-2"),
        (
            {"cache_fingerprint": FINGERPRINT.replace("weights:m1", "weights:m2")},
            "base model weights:m1 -> weights:m2",
        ),
        (
            {"cache_fingerprint": FINGERPRINT.replace("+abc+", "+def+")},
            "code version 0.1.0+abc+img -> 0.1.0+def+img",
        ),
    ],
)
def test_any_result_changing_input_trains_and_names_it(champion, change, named):
    word, tags = _decide("changed", **change)
    assert word == "train"
    assert tags["training_decision_reason"] == f"changed since champion gate/1: {named}"
    assert "qlora.reused_champion" not in tags


def test_force_retrain_trains(champion):
    word, tags = _decide("forced", force_retrain=True)
    assert word == "train" and "forced" in tags["training_decision_reason"]


def test_a_champion_without_a_record_is_not_reused(store):
    """A version registered before versions recorded what they were made from."""
    from qlora_kfp.tracking import registry

    registry.register("old", "file:///nowhere", "", {"dataset_digest": "digest-1"}, 0.5)
    word, tags = _decide("after-upgrade", registered_model_name="old")
    assert word == "train"
    assert "does not record what it was made from" in tags["training_decision_reason"]


def console_lines(tmp_path, task_log: str) -> list[str]:
    """What `make run` prints for decide-training, given the lines its task logged."""
    from kfp.local import logging_utils, status

    from qlora_kfp.app.progress import TaskProgress

    name = logging_utils.format_task_name("decide-training")
    ok = logging_utils.format_status(status.Status.SUCCESS)
    out = io.StringIO()
    tap = TaskProgress(tmp_path / "runner.log", out)
    tap.write(
        f"12:00:00.000 - INFO - Executing task {name}\n{task_log}"
        f"12:00:01.000 - INFO - Task {name} finished with status {ok}\n"
    )
    tap.close()
    return [line.strip() for line in out.getvalue().splitlines()]


def test_the_console_says_why_training_was_skipped_and_how_to_force_it(tmp_path):
    shown = console_lines(
        tmp_path,
        "    2026 qlora_kfp WARNING training skipped: dataset unchanged since champion m/1 "
        "(run r1), and so are ...; to train anyway: force_retrain=true (qlora-kfp run "
        "--force_retrain)\n",
    )
    assert shown[1] == (
        "decide-training        training skipped: dataset unchanged since champion m/1 (run "
        "r1), and so are ...; to train anyway: force_retrain=true (qlora-kfp run --force_retrain)"
    )


def test_the_summary_says_no_model_was_trained(capsys):
    from qlora_kfp.app.summary import print_summary

    skipped = {"decide-training": {"outputs": {"parameterValues": {"Output": "skip"}}}}
    print_summary({"run_dir": "/runs/x", "tasks": skipped})
    assert "no model trained: training was skipped" in capsys.readouterr().out


def test_uncommitted_code_edits_change_the_code_version(tmp_path, monkeypatch):
    """A checkout's edited code is not the commit's: the gate (and the cache keys) see it."""
    import subprocess

    from qlora_kfp import version
    from qlora_kfp.storage import fingerprint

    monkeypatch.delenv("QLORA_KFP_GIT_COMMIT", raising=False)
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    (tmp_path / "qlora_kfp").mkdir()
    (tmp_path / "qlora_kfp" / "stage.py").write_text("LR = 1\n")
    (tmp_path / "notes.md").write_text("a\n")
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    assert version.uncommitted_changes(str(tmp_path)) == ""
    (tmp_path / "notes.md").write_text("b\n")  # not code
    assert version.uncommitted_changes(str(tmp_path)) == ""
    (tmp_path / "qlora_kfp" / "stage.py").write_text("LR = 2\n")
    edited = version.uncommitted_changes(str(tmp_path))
    assert len(edited) == 12
    real = version.uncommitted_changes
    monkeypatch.setattr(version, "uncommitted_changes", lambda: real(str(tmp_path)))
    assert f"-edited.{edited}+" in fingerprint.code_version()
    monkeypatch.setenv("QLORA_KFP_GIT_COMMIT", "abc")  # an image names its code exactly
    assert real(str(tmp_path)) == ""


def test_the_console_says_why_it_trains(tmp_path):
    """A run that trains says why too (what changed since the champion), in one line."""
    shown = console_lines(
        tmp_path,
        "    [KFP Executor 2026-12-05 12:57:44,272 INFO]: training decision: train (no champion "
        "yet)\n"
        "    [KFP Executor 2026-12-05 12:57:44,272 INFO]: training: no champion yet\n",
    )
    assert shown[1] == "decide-training        training: no champion yet"
    assert len(shown) == 3


def test_the_webhook_line_of_a_skipped_run_says_no_model_was_trained():
    from qlora_kfp.tracking import report

    tags = {"training_decision": "skip", "qlora.reused_champion_version": "m/3"}
    line = report.summary("SUCCEEDED", "run-1", {}, "", tags)
    assert line == "qlora-finetune run-1: SUCCEEDED | no model trained: reuses champion m/3"


def test_a_bad_setting_fails_decide_training_in_one_line(store):
    with pytest.raises(SystemExit, match=r"^decide-training failed: lora_r=0 is invalid"):
        _decide("bad", lora_r=0)
