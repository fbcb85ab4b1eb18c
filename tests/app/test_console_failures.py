"""A failed local run's console: one clear line per failure, one final state per task, the
traceback in runner.log only (make run's output as a user sees it)."""

from __future__ import annotations

import sys

from kfp.local import logging_utils, status

from qlora_kfp.app import cli, local_runner, progress


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

    monkeypatch.setattr(local_runner, "run_pipeline", run_pipeline)
    monkeypatch.setattr(local_runner, "local_tracking_env", lambda workdir: None)
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


def test_sweep_trials_training_at_once_keep_their_own_progress_lines(tmp_path):
    """Two trials train at once; the last task started (evaluate) is not the one training."""
    import io

    from qlora_kfp.app.progress import TaskProgress

    out = io.StringIO()
    tap = TaskProgress(tmp_path / "runner.log", out)
    name = logging_utils.format_task_name
    tap.write(f"12:00:00.000 - INFO - Executing task {name('train')}\n" * 2)
    tap.write(f"12:00:00.000 - INFO - Executing task {name('evaluate')}\n")
    for step, trial in ((10, "a"), (11, "b"), (11, "a"), (30, "b")):
        tap.write(f"    INFO progress: [trial-{trial}] step {step}/40 ({100 * step // 40}%) | x\n")
    tap.close()
    shown = [line.strip() for line in out.getvalue().splitlines()][3:]
    assert shown == [
        "train                  [trial-a] step 10/40 (25%) | x",
        "train                  [trial-b] step 11/40 (27%) | x",  # its own tenth, not a's
        "train                  [trial-b] step 30/40 (75%) | x",
    ]


def test_a_trials_progress_lines_name_the_trial(caplog):
    import logging

    from qlora_kfp.tracking import live

    with caplog.at_level(logging.INFO, logger=live.log.name), live.progress_label("trial-ab"):
        live.Progress()({"step": 1, "loss": 2.0}, 4)
    live.Progress()({"step": 2, "loss": 2.0}, 4)  # outside a trial: no label
    lines = [r.getMessage() for r in caplog.records if r.name == live.log.name]
    assert lines[0].startswith("progress: [trial-ab] step 1/4 (25%) | loss 2.0000")
    assert not any("[trial-ab] step 2" in line for line in lines)


def test_output_after_a_sweep_is_not_left_indented(tmp_path, capsys):
    """kfp.local swaps builtins.print to indent task output; concurrent tasks can leave the
    swap in place, indenting the summary printed after the run."""
    import builtins

    real = builtins.print

    def run():
        builtins.print = lambda *a, **k: real("    ", *a, **k)  # a swap nobody restored

    progress.run_quietly(run, tmp_path / "runner.log")
    print("summary")
    assert builtins.print is real and capsys.readouterr().out == "summary\n"


def test_logging_after_a_sweep_does_not_write_to_the_closed_progress_stream(tmp_path):
    """kfp.local's logger context swaps the root logger's handlers for one on sys.stdout (the
    run's progress stream) and puts back what it found; two trials entering it at once leave
    the first one's handler behind, writing to the stream run_quietly has closed: every later
    log record then printed a "--- Logging error ---" traceback."""
    import logging
    import threading

    from kfp.local import logging_utils

    root = logging.getLogger()
    before = (root.handlers[:], root.level)
    in_first, in_second, first_left = (threading.Event() for _ in range(3))

    def first() -> None:
        with logging_utils.local_logger_context():
            in_first.set()
            in_second.wait(10)
        first_left.set()

    def second() -> None:
        in_first.wait(10)
        with logging_utils.local_logger_context():  # saves the first one's handler
            in_second.set()
            first_left.wait(10)  # puts it back after the first has left

    def run():
        threads = [threading.Thread(target=first), threading.Thread(target=second)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    progress.run_quietly(run, tmp_path / "runner.log")
    assert (root.handlers, root.level) == before
