"""The ``qlora-kfp`` command's own exit (``cli.entry``): its status and every line it
printed, though it leaves without finalizing its modules (``qlora_kfp/fast_exit.py``)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "args, status, stream, text",
    [
        pytest.param(["compile", "--output_dir", "{tmp}"], 0, "stdout", '"compiled"', id="ok"),
        pytest.param(
            ["run", "--workdir", "{tmp}", "--params_file", "{tmp}/none.yaml"],
            2,
            "stderr",
            "no such params file",
            id="user-error",
        ),
    ],
)
def test_status_and_output_survive_the_fast_exit(tmp_path, args, status, stream, text):
    argv = [a.format(tmp=tmp_path) for a in args]
    proc = subprocess.run(
        [sys.executable, "-m", "qlora_kfp.app.cli", *argv], capture_output=True, text=True
    )
    assert proc.returncode == status, proc.stderr
    assert text in getattr(proc, stream)
    if status == 0:  # printed into a pipe (block-buffered), flushed before leaving
        assert json.loads(proc.stdout)["compiled"]


def test_the_console_script_is_the_entry():
    from importlib.metadata import entry_points

    (script,) = entry_points(group="console_scripts", name="qlora-kfp")
    assert script.value == "qlora_kfp.app.cli:entry"
