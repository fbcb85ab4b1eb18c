"""One line per task while a pipeline runs locally; the local runner's full log to a file.

``kfp.local`` prints every task's streamed log, its outputs as JSON and separators (about
1,600 lines for one run). :class:`TaskProgress` stands in for ``sys.stdout`` while the
pipeline runs: every line goes to the log file, and the terminal gets a line when a task starts
and when it ends (done in N s, skipped, failed with the reason), a train progress line per
tenth of the run, and nothing else, unless ``verbose``. Warnings go to the log file too.
"""

from __future__ import annotations

import builtins
import io
import logging
import re
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import TextIO

from qlora_kfp.errors import PipelineFailed

ANSI = re.compile(r"\x1b\[[0-9;]*m")
STARTED = re.compile(r"Executing task '([\w-]+)'")
FINISHED = re.compile(r"Task '([\w-]+)' finished with status (\w+)")
SKIPPED = re.compile(r"Skipping (?:conditional )?task '?([\w-]+)'?")
FAILED_LINE = re.compile(r"(\S[\w-]* failed: .+)$")  # a stage's one-line error (tasks.context.fail)
# tracking.live.Progress, in the train task only; a sweep trial's names the trial.
TRAIN_PROGRESS = re.compile(r"progress: ((?:\[([\w-]+)\] )?step .+)$")
# kfp.local's exception when a task fails (pipeline_orchestrator.log_and_maybe_raise_for_failure).
PIPELINE_FAILED = re.compile(
    r"Pipeline '([\w-]+)' finished with status \w+\. Inner task failed: '([\w-]+)'"
)
# decide-training's one line (tasks.bookkeeping_tasks.decide_training): why it skips training,
# or trains.
DECISION = re.compile(r"(?:\]:| INFO| WARNING) (training(?: skipped)?: .+)$")


class TaskProgress(io.TextIOBase):
    """A write-only text stream that logs everything and shows task progress.

    Args:
        log_path: File that receives every line.
        out: Where progress lines go (the real stdout).
        verbose: Also pass every line through to ``out``.
    """

    def __init__(self, log_path: str | Path, out: TextIO, verbose: bool = False):
        self.log = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.out, self.verbose = out, verbose
        self.buffer_ = ""
        self.started: dict[str, float] = {}
        self.ended: set[str] = set()  # tasks whose final state was shown
        self.failures: dict[str, str] = {}
        self.current = ""
        self.tenth: dict[str, int | None] = {}

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.log.write(text)
        if self.verbose:
            self.out.write(text)
        self.buffer_ += text
        while "\n" in self.buffer_:
            line, self.buffer_ = self.buffer_.split("\n", 1)
            self._line(ANSI.sub("", line).strip())
        return len(text)

    def flush(self) -> None:
        if not self.log.closed:
            self.log.flush()
        self.out.flush()

    def close(self) -> None:
        super().close()  # flushes first
        self.log.close()

    def _show(self, line: str) -> None:
        if not self.verbose:
            self.out.write(line + "\n")
            self.out.flush()

    def _line(self, line: str) -> None:
        if m := STARTED.search(line):
            self.current = m.group(1)
            self.started[self.current] = time.monotonic()
            self._show(f"  {self.current:<22} running")
        elif m := FINISHED.search(line):
            task, state = m.group(1), m.group(2)
            self.ended.add(task)
            seconds = time.monotonic() - self.started.get(task, time.monotonic())
            if state == "SUCCESS":
                self._show(f"  {task:<22} done in {seconds:.1f} s")
            else:
                reason = self.failures.get(task, "see the log")
                self._show(f"  {task:<22} FAILED after {seconds:.1f} s: {reason}")
        elif m := SKIPPED.search(line):
            self._show(f"  {m.group(1):<22} skipped")
        elif m := TRAIN_PROGRESS.search(line):
            # A line per tenth of each training run (the log file has every one), labelled
            # train: sweep trials run at once, so the last task started may be another.
            pct = re.search(r"\((\d+)%\)", m.group(1))
            tenth = int(pct.group(1)) // 10 if pct else None
            key = m.group(2) or "train"
            if tenth is None or tenth != self.tenth.get(key):
                self.tenth[key] = tenth
                self._show(f"  {'train':<22} {m.group(1)}")
        elif self.current == "decide-training" and (m := DECISION.search(line)):
            self._show(f"  {self.current:<22} {m.group(1)}")
        elif (m := FAILED_LINE.search(line)) and self.current:
            self.failures[self.current] = m.group(1)


def run_quietly(fn, log_path: str | Path, verbose: bool = False):
    """Call ``fn()`` with stdout going through a :class:`TaskProgress`; returns its result."""
    real, show_warning, real_print = sys.stdout, warnings.showwarning, builtins.print
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    tap = TaskProgress(log_path, real, verbose)
    sys.stdout = tap

    def to_log(message, category, filename, lineno, file=None, line=None):
        # kfp.local warns about pod settings it ignores, once per task: the log keeps them.
        tap.log.write(warnings.formatwarning(message, category, filename, lineno, line))

    warnings.showwarning = to_log
    try:
        return fn()
    except Exception as exc:
        # One final state per task: a task that already showed "done" or "FAILED" shows
        # nothing more; the traceback goes to the log only.
        if tap.current and tap.current not in tap.ended:
            tap._show(f"  {tap.current:<22} FAILED: {tap.failures.get(tap.current, 'see the log')}")
        tap.log.write(traceback.format_exc())
        if m := PIPELINE_FAILED.search(ANSI.sub("", str(exc))):
            pipeline, task = m.group(1), m.group(2)
            why = tap.failures.get(task, "see the log").removeprefix(f"{task} failed: ")
            raise PipelineFailed(f"{pipeline} stopped: {task} failed: {why}") from None
        raise
    finally:
        sys.stdout, warnings.showwarning = real, show_warning
        # kfp.local indents a task's output by swapping builtins.print; tasks running at once
        # (a sweep's trials) restore each other's swap, leaving every later print indented.
        builtins.print = real_print
        # Its logger context the same: it swaps the root logger's handlers for one on
        # sys.stdout (``tap``) and puts back what it found, which for the second of two trials
        # is the first one's handler, left writing to ``tap`` once closed: every later record
        # printed a "--- Logging error ---" traceback.
        root.handlers[:], root.level = handlers, level
        tap.close()
