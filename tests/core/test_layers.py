"""The import graph has floors, and no module imports a floor above its own.

app -> pipelines -> components -> tasks -> stages/preflight -> data/training/tracking ->
storage -> configs -> errors/version/env. Imports inside function bodies count too: a component
imports the library in its body, and that is still an edge of the graph.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Source folder -> the package it installs as (pyproject's package-dir).
SOURCES = {
    ROOT / "qlora_kfp": "qlora_kfp",
    ROOT / "components": "qlora_kfp.components",
    ROOT / "pipelines": "qlora_kfp.pipelines",
}
FLOORS = [
    ("qlora_kfp.errors", "qlora_kfp.version", "qlora_kfp.env", "qlora_kfp.fast_exit"),
    ("qlora_kfp.configs",),
    ("qlora_kfp.storage",),
    ("qlora_kfp.data", "qlora_kfp.training", "qlora_kfp.tracking"),
    ("qlora_kfp.stages", "qlora_kfp.preflight"),
    ("qlora_kfp.tasks",),
    ("qlora_kfp.components",),
    ("qlora_kfp.pipelines",),
    ("qlora_kfp.app",),
]


def floor(module: str) -> int:
    for i, prefixes in enumerate(FLOORS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} is on no floor: add it to FLOORS")


def modules(sources: dict[Path, str] = SOURCES) -> dict[str, Path]:
    out = {}
    for folder, package in sources.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            out[name] = path
    return out


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from qlora_kfp import configs` imports the module qlora_kfp.configs.
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m.startswith("qlora_kfp.")}


def edges(sources: dict[Path, str] = SOURCES) -> list[tuple[str, str]]:
    mods = modules(sources)
    out = []
    for name, path in mods.items():
        for target in imports(path):
            # keep targets that are modules or packages of the project (not names in them)
            while target not in mods and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in mods and target not in (name, "qlora_kfp"):
                out.append((name, target))
    return sorted(set(out))


def upward(sources: dict[Path, str] = SOURCES) -> list[str]:
    return [
        f"{a} (floor {floor(a)}) imports {b} (floor {floor(b)})"
        for a, b in edges(sources)
        if a != "qlora_kfp" and floor(b) > floor(a)
    ]


def test_every_module_is_on_a_floor():
    for name in modules():
        if name != "qlora_kfp":
            floor(name)


def test_no_module_imports_a_floor_above_its_own():
    assert upward() == []


def test_no_stage_imports_another_stage():
    """Stages meet only in their artifacts, whose files qlora_kfp.storage.artifacts defines:
    one stage can be read from its component to its last write without the others."""

    def stage(module: str) -> str:  # stages/train_loop.py is part of the train stage
        return module.removeprefix("qlora_kfp.stages.").split("_")[0]

    assert [
        (a, b)
        for a, b in edges()
        if a.startswith("qlora_kfp.stages.")
        and b.startswith("qlora_kfp.stages.")
        and stage(a) != stage(b)
    ] == []


def test_the_library_imports_no_kfp_wiring():
    """Everything below components is plain library code, callable without KFP."""
    library = [n for n in modules() if n != "qlora_kfp" and floor(n) < floor("qlora_kfp.tasks")]
    for name in library:
        text = modules()[name].read_text()
        assert "from kfp" not in text and "import kfp" not in text, name


@pytest.mark.parametrize(
    "importer,line",
    [
        pytest.param(
            "storage/s3.py", "from qlora_kfp.tracking import parent_run", id="storage-to-tracking"
        ),
        pytest.param(
            "stages/train.py", "from qlora_kfp.tasks import stage_tasks", id="stage-to-task"
        ),
        pytest.param("configs.py", "    from qlora_kfp.training.batching import x", id="in-a-body"),
    ],
)
def test_the_check_catches_an_upward_import(tmp_path, importer, line):
    pkg = tmp_path / "qlora_kfp"
    for rel in (
        "storage/s3.py",
        "tracking/parent_run.py",
        "stages/train.py",
        "tasks/stage_tasks.py",
        "training/batching.py",
        "configs.py",
    ):
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).touch()
    body = line if not line.startswith(" ") else f"def f():\n{line}"
    (pkg / importer).write_text(body + "\n")
    found = upward({pkg: "qlora_kfp"})
    module = "qlora_kfp." + importer[:-3].replace("/", ".")
    assert len(found) == 1 and found[0].startswith(f"{module} "), found
