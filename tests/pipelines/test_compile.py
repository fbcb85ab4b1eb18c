"""The committed YAML is what `make compile` writes, and compiling needs no torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPILED = ROOT / "pipelines" / "compiled"


def test_committed_yaml_is_up_to_date(tmp_path, monkeypatch):
    from qlora_kfp.app.compile import compile_all

    for var in (
        "QLORA_KFP_REGISTRY",
        "QLORA_KFP_TAG",
        "QLORA_KFP_CPU_IMAGE",
        "QLORA_KFP_GPU_IMAGE",
    ):
        monkeypatch.delenv(var, raising=False)
    for path in map(Path, compile_all(tmp_path)):
        golden = COMPILED / path.name
        assert golden.is_file(), f"{golden} is missing: run make compile and commit it"
        assert path.read_text() == golden.read_text(), (
            f"{golden.name} is stale: run `make compile` and commit the result"
        )


# Each compiling process also checks that compiling imported no training library.
NO_TORCH = (
    "import sys; "
    "bad = [m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules]; "
    "assert not bad, bad"
)


def test_compiling_twice_gives_the_same_bytes_and_imports_no_torch(tmp_path):
    """Two processes with different hash seeds (dict order in KFP's header comment varies)."""
    out = []
    for seed in ("1", "2"):
        code = (
            f"from qlora_kfp.app.compile import compile_all; compile_all({str(tmp_path / seed)!r})"
            f"; {NO_TORCH}"
        )
        subprocess.run(
            [sys.executable, "-c", code],
            check=True,
            cwd=ROOT,
            env={"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": seed},
        )
        out.append(sorted((p.name, p.read_bytes()) for p in (tmp_path / seed).iterdir()))
    assert out[0] == out[1]


def test_images_are_set_at_compile_time(tmp_path):
    env = {
        "QLORA_KFP_REGISTRY": "registry.example.com/ml",
        "QLORA_KFP_TAG": "v9",
        "PATH": "/usr/bin:/bin",
    }
    code = f"from qlora_kfp.app.compile import compile_all; compile_all({str(tmp_path)!r})"
    subprocess.run([sys.executable, "-c", f"{code}; {NO_TORCH}"], check=True, cwd=ROOT, env=env)
    spec, _ = load(tmp_path / "qlora_finetune.yaml")
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {
        "registry.example.com/ml/qlora-kfp-cpu:v9",
        "registry.example.com/ml/qlora-kfp-gpu:v9",
    }


def load(path: Path) -> tuple[dict, dict]:
    """The pipeline spec and the platform (Kubernetes) spec of a compiled file."""
    docs = list(yaml.safe_load_all(path.read_text()))
    return docs[0], (docs[1] if len(docs) > 1 else {})


def test_pipeline_shape():
    spec, _ = load(COMPILED / "qlora_finetune.yaml")
    comps = spec["components"]
    outer = comps["comp-exit-handler-1"]["dag"]["tasks"]
    assert {"start-tracking", "preflight", "prepare-dataset", "decide-training"} <= set(outer)
    assert "preflight" in outer["condition-2"]["dependentTasks"]  # no GPU task before it
    gated = comps["comp-condition-2"]["dag"]["tasks"]
    assert set(gated) == {"quantize", "train", "evaluate", "merge", "register-model"}
    assert outer["condition-2"]["triggerPolicy"]["condition"] == (
        "inputs.parameter_values['pipelinechannel--decide-training-Output'] == 'train'"
    )
    assert sorted(gated["merge"]["dependentTasks"]) == ["evaluate", "train"]
    root = spec["root"]["dag"]["tasks"]
    assert root["finish-tracking"]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"


def test_a_component_is_the_component_whichever_way_it_was_imported():
    """Importing a component's module first (``import qlora_kfp.components.preflight``) binds
    the package's attribute to the module; the pipeline then found a module, not a component
    (``pytest tests/training/test_memory.py tests/stages/test_tracebacks.py`` failed 18 cases that way)."""
    code = (
        "import importlib, qlora_kfp.components as c\n"
        "for name in c.__all__:\n"
        "    importlib.import_module(f'qlora_kfp.components.{name}')\n"
        "    got = getattr(c, name)\n"
        "    assert hasattr(got, 'component_spec'), (name, got)\n"
        "from qlora_kfp.components import preflight\n"
        "assert hasattr(preflight, 'component_spec'), preflight\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_building_a_pipeline_reads_no_source_and_kfp_still_names_the_caller():
    """KFP 2.17's ``PipelineTask._ensure_container_spec_exists`` calls ``inspect.stack()`` (the
    source lines and module of every frame) to name its caller in an error message; building
    the two pipelines made 148 such calls, 5 s of 5.5 s in a process that has torch loaded and
    10-40 s under pytest. Built through ``pipelines.params``, no frame's source is read, and
    the error still names the method."""
    import inspect

    from kfp import dsl
    from kfp.dsl import pipeline_task
    from qlora_kfp.pipelines import params

    code = (
        "import inspect, sys\n"
        "calls = []\n"
        "real = inspect.getsourcefile\n"
        "inspect.getsourcefile = lambda o: (inspect.isframe(o) and calls.append(o)) or real(o)\n"
        "import qlora_kfp.pipelines.qlora_finetune, qlora_kfp.pipelines.qlora_sweep\n"
        "assert not calls, f'{len(calls)} frames looked up'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)

    @dsl.component
    def leaf():  # no annotations: this module's `from __future__ import annotations` hides them
        pass

    @dsl.pipeline
    def inner():
        leaf()

    @params.pipeline_params(params.configs.PrepareConfig, exclude=())
    def outer(p: dict) -> None:
        inner().set_env_variable("A", "b")

    with pytest.raises(ValueError, match="set_env_variable can only be used on single-step"):
        dsl.pipeline(outer)
    assert pipeline_task.inspect is inspect  # put back after the build, even a failed one
