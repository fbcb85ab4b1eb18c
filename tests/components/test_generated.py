"""Generated files are current, and a new parameter is one edit of ``configs.py``.

The component modules and the README's parameter table come from ``components/spec.py`` and
the stage configs (``make generate``); the pipelines take their signatures from the configs.
The README's environment table comes from ``qlora_kfp/env.py`` the same way.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qlora_kfp.app import generate

ROOT = Path(__file__).resolve().parents[2]


def test_generated_files_are_current():
    assert generate.stale(ROOT) == [], "run `make generate` and commit the result"


def test_a_stale_environment_table_fails(tmp_path):
    row = "| `QLORA_KFP_TAG` | `0.1.0` |"
    text = (ROOT / "README.md").read_text()
    assert generate.ENV_BEGIN in text and row in text
    (tmp_path / "README.md").write_text(text.replace(row, "| `QLORA_KFP_TAG` | `0.0.9` |"))
    assert generate.stale(tmp_path) == [str(tmp_path / "README.md")]


def test_a_new_variable_is_one_edit_of_env_py(monkeypatch):
    from qlora_kfp import env

    monkeypatch.setitem(env.VARS, "QLORA_KFP_NEW", env.Var("QLORA_KFP_NEW", "a knob", "2", int))
    assert "| `QLORA_KFP_NEW` | `2` | `task` | qlora-kfp | a knob |" in generate.env_table()


def _package_copy(tmp: Path) -> Path:
    """The project as it installs (components/ and pipelines/ inside qlora_kfp/), to import
    from a temporary copy with PYTHONPATH."""
    site = tmp / "site"
    shutil.copytree(
        ROOT / "qlora_kfp", site / "qlora_kfp", ignore=shutil.ignore_patterns("__pycache__")
    )
    for sub in ("components", "pipelines"):
        shutil.copytree(
            ROOT / sub, site / "qlora_kfp" / sub, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(ROOT / "README.md", site / "README.md")
    return site


ADDED = """    lora_new_knob: int = _help("A knob added to prove one edit is enough.", default=7)
"""


@pytest.mark.slow
def test_a_new_train_parameter_is_one_edit(tmp_path):
    site = _package_copy(tmp_path)
    cfg = site / "qlora_kfp" / "configs.py"
    text = cfg.read_text()
    anchor = '    lora_r: int = _help("LoRA rank.", default=16)\n'
    assert anchor in text
    cfg.write_text(text.replace(anchor, anchor + ADDED))  # the one edit

    script = f"""
import json, sys
from qlora_kfp.app import generate, compile as comp
from qlora_kfp.app.cli import build_parser
generate.write({str(site)!r})
comp.compile_all({str(tmp_path / "compiled")!r})
help_train = build_parser().parse_args(["train", "m", "d", "o", "--lora_new_knob", "9"])
print(json.dumps({{"train_flag": help_train.lora_new_knob}}))
"""
    env = {"PYTHONPATH": str(site), "PATH": str(Path(sys.executable).parent), "HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"train_flag": 9}

    spec = next(yaml.safe_load_all((tmp_path / "compiled" / "qlora_finetune.yaml").read_text()))
    root = spec["root"]["inputDefinitions"]["parameters"]["lora_new_knob"]
    assert root["defaultValue"] == 7 and root["parameterType"] == "NUMBER_INTEGER"
    assert root["description"] == "A knob added to prove one edit is enough."
    comp = spec["components"]["comp-train"]["inputDefinitions"]["parameters"]["lora_new_knob"]
    assert comp["defaultValue"] == 7 and comp["description"] == root["description"]
    # the train task receives the pipeline's value
    gated = spec["components"]["comp-condition-2"]["dag"]["tasks"]["train"]
    assert gated["inputs"]["parameters"]["lora_new_knob"] == {
        "componentInputParameter": "pipelinechannel--lora_new_knob"
    }
    sweep = next(yaml.safe_load_all((tmp_path / "compiled" / "qlora_sweep.yaml").read_text()))
    assert "lora_new_knob" in sweep["root"]["inputDefinitions"]["parameters"]
    assert "| train | `lora_new_knob` | `7` | A knob added" in (site / "README.md").read_text()
    assert "lora_new_knob: int = 7" in (site / "qlora_kfp" / "components" / "train.py").read_text()


def test_every_pipeline_parameter_has_a_description_in_the_compiled_yaml():
    for name in ("qlora_finetune", "qlora_sweep"):
        spec = next(
            yaml.safe_load_all((ROOT / "pipelines" / "compiled" / f"{name}.yaml").read_text())
        )
        params = spec["root"]["inputDefinitions"]["parameters"]
        missing = [k for k, v in params.items() if not v.get("description")]
        assert missing == [], f"{name}: {missing}"


def test_each_component_calls_the_task_function_of_its_own_name():
    """One name from the component to the function it calls (``finish_tracking`` called
    ``bookkeeping_tasks.finish``), so a reader finds the task by the component's name."""
    from qlora_kfp.components.spec import COMPONENTS

    wrong = {s.name: s.call for s in COMPONENTS if s.call.rpartition(".")[2] != s.name}
    assert not wrong, f"component -> the task function it calls: {wrong}"
