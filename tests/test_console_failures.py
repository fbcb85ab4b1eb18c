"""A failed local run's console: one clear line per failure, one final state per task, the
traceback in runner.log only (make run's output as a user sees it)."""

from __future__ import annotations

import sys

from kfp.local import logging_utils, status

from qlora_kfp.app import cli, local_run, progress


def task_lines(task: str, ok: bool, body: list[str]) -> str:
    name = logging_utils.format_task_name(task)
    state = logging_utils.format_status(status.Status.SUCCESS if ok else status.Status.FAILURE)
    return "\n".join(
        [
            f"12:00:00.000 - INFO - Executing task {name}",
            *[f"    {line}" for line in body],
            f"12:00:01.000 - INFO - Task {name} finished with status {state}",
            "",
        ]
    )


def failing_run():
    """What kfp.local prints and raises when prepare-dataset fails on a bad row."""
    bad = "data.jsonl, row 2, field 'completion': expected text, got int"
    sys.stdout.write(
        task_lines(
            "prepare-dataset",
            False,
            [f"2026 qlora_kfp ERROR prepare-dataset failed: {bad}", "Traceback (most recent"],
        )
    )
    sys.stdout.write(task_lines("preflight", True, ["ok"]))
    sys.stdout.write(task_lines("finish-tracking", True, ["run outcome: FAILED"]))
    pipeline = logging_utils.format_pipeline_name("qlora-finetune")
    failed = logging_utils.format_status(status.Status.FAILURE)
    chain = " inside ".join(
        logging_utils.format_task_name(t) for t in ("prepare-dataset", "exit-handler-1")
    )
    raise RuntimeError(
        f"Pipeline {pipeline} finished with status {failed}. Inner task failed: {chain}."
    )


def test_a_failed_task_is_one_line_and_the_run_one_error(tmp_path, monkeypatch, capsys):
    def run_pipeline(pipeline, params, workdir, verbose=False):
        progress.run_quietly(failing_run, tmp_path / "runner.log", verbose)

    monkeypatch.setattr(local_run, "run_pipeline", run_pipeline)
    monkeypatch.setattr(local_run, "local_tracking_env", lambda workdir: None)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = ["run", "--workdir", str(tmp_path), "--base_model", "m", "--data_source", "d.jsonl"]
    assert cli.main(args) == 2
    captured = capsys.readouterr()
    shown = [line.split() for line in captured.out.splitlines()]
    finals = [w[0] for w in shown if w[1] in ("done", "FAILED", "FAILED:")]
    assert finals == ["prepare-dataset", "preflight", "finish-tracking"]  # one each
    assert "Traceback" not in captured.out + captured.err
    assert captured.err == (
        "error: qlora-finetune stopped: prepare-dataset failed: data.jsonl, row 2, field "
        "'completion': expected text, got int\n"
    )
    log = (tmp_path / "runner.log").read_text()
    assert "RuntimeError: Pipeline" in log  # the traceback is kept, in the log


def test_building_the_demo_prints_no_progress_bar(tmp_path, capfd):
    """The demo's model is written before the pipeline starts: nothing of it on the console."""
    from qlora_kfp.app.demo import make_demo_assets

    make_demo_assets(tmp_path / "demo")
    out, err = capfd.readouterr()
    assert "Writing model shards" not in out + err
