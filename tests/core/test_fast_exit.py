"""A finished task process leaves without finalizing its modules, and with the exit status
Python would give it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from qlora_kfp import fast_exit

SCRIPT = textwrap.dedent(
    """
    import atexit, os, sys, types
    if {executor!r}:  # what `python -m kfp.dsl.executor_main` makes __main__
        sys.modules["__main__"].__spec__ = types.SimpleNamespace(name="kfp.dsl.executor_main")
    from qlora_kfp.fast_exit import ends_fast

    fd = os.open({out!r}, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    atexit.register(lambda: os.write(fd, b"atexit "))  # MLflow's and logging's flushes

    class Module:  # finalized only when Python tears the process's modules down
        def __del__(self, write=os.write):
            write(fd, b"torn-down ")

    held = Module()

    @ends_fast
    def task(args):
        if args == "fails":
            sys.exit("task failed: a bad row")
        return args

    task({task!r})
    if {after!r}:
        raise RuntimeError("writing the outputs failed")
    """
)


@pytest.mark.parametrize(
    "executor, task, after, status, seen",
    [
        pytest.param(True, "ok", False, 0, "atexit", id="returned-in-kfp-executor"),
        pytest.param(True, "ok", True, 1, "atexit", id="error-after-the-task"),
        pytest.param(True, "fails", False, 1, "atexit torn-down", id="task-failed"),
        pytest.param(False, "ok", False, 0, "atexit torn-down", id="not-kfp-s-executor"),
    ],
)
def test_exit_status_handlers_and_teardown(tmp_path, executor, task, after, status, seen):
    out = tmp_path / "out"
    code = SCRIPT.format(executor=executor, out=str(out), task=task, after=after)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == status, proc.stderr
    assert out.read_text().split() == seen.split()
    if after:
        assert "RuntimeError: writing the outputs failed" in proc.stderr
    if task == "fails":
        assert "task failed: a bad row" in proc.stderr


def test_only_kfp_s_executor_counts():
    assert not fast_exit.in_kfp_executor()  # pytest's __main__


def test_every_component_s_task_function_ends_fast():
    """What each component's body calls (``<module>.<task>(locals())``)."""
    import importlib
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "components"
    calls = set()
    for path in root.glob("*.py"):
        calls |= set(re.findall(r"(\w+_tasks)\.(\w+)\(locals\(\)\)", path.read_text()))
    assert len(calls) == 12
    for module, name in sorted(calls):
        fn = getattr(importlib.import_module(f"qlora_kfp.tasks.{module}"), name)
        assert getattr(fn, "__wrapped__", None) is not None, f"{module}.{name}"
