"""`make run`'s terminal output: one line per task, the runner's whole log in a file."""

from __future__ import annotations

import io

from kfp.local import logging_utils, status

from qlora_kfp.app.progress import TaskProgress


def runner_lines(task: str, ok: bool, body: list[str]) -> str:
    """What kfp.local prints for one task, formatted by kfp.local's own helpers."""
    name = logging_utils.format_task_name(task)
    state = logging_utils.format_status(status.Status.SUCCESS if ok else status.Status.FAILURE)
    return "\n".join(
        [
            f"12:00:00.000 - INFO - Executing task {name}",
            "12:00:00.001 - INFO - Streamed logs:",
            *[f"    {line}" for line in body],
            f"12:00:01.000 - INFO - Task {name} finished with status {state}",
            '12:00:01.001 - INFO - Task outputs:\n    {"Output": "x"}',
            "-" * 80,
            "",
        ]
    )


def test_one_line_per_task_and_everything_in_the_log(tmp_path):
    out = io.StringIO()
    tap = TaskProgress(tmp_path / "runner.log", out)
    tap.write(runner_lines("prepare-dataset", True, ["reading data.jsonl"] * 50))
    tap.write(
        runner_lines(
            "train",
            True,
            [
                "2026 qlora_kfp.tracking.live INFO progress: step 10/40 (25%) | loss 1.2345",
                "2026 qlora_kfp.tracking.live INFO progress: step 11/40 (27%) | loss 1.2000",
            ],
        )
    )
    tap.write("12:00:02 - INFO - Skipping conditional task 'merge': condition not met\n")
    tap.write(
        runner_lines(
            "quantize",
            False,
            ["2026 qlora_kfp ERROR quantize failed: s3://m/x: no such object", "Traceback ..."],
        )
    )
    tap.close()
    shown = [line.strip() for line in out.getvalue().splitlines()]
    assert [line.split()[0] for line in shown] == [
        "prepare-dataset",
        "prepare-dataset",
        "train",
        "train",
        "train",
        "merge",
        "quantize",
        "quantize",
    ]
    assert shown[1].startswith("prepare-dataset") and " done in " in shown[1]
    # one line per tenth of the run: step 11 (27%) is in the same tenth as step 10 (25%)
    assert shown[3].split(None, 1)[1] == "step 10/40 (25%) | loss 1.2345"
    assert shown[5].endswith("skipped")
    assert shown[7].split(None, 1)[1].startswith("FAILED after ")
    assert shown[7].endswith(": quantize failed: s3://m/x: no such object")
    log = (tmp_path / "runner.log").read_text()
    assert log.count("reading data.jsonl") == 50 and "Traceback" in log


def test_verbose_passes_everything_through(tmp_path):
    out = io.StringIO()
    tap = TaskProgress(tmp_path / "runner.log", out, verbose=True)
    text = runner_lines("train", True, ["a line"])
    tap.write(text)
    tap.close()
    assert out.getvalue() == text
