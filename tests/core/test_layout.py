"""The tests mirror the package: each test file sits in the folder of what it tests.

``tests/<subpackage>/`` holds the tests of ``qlora_kfp/<subpackage>/`` (one folder per
subpackage that exists); the other folders are the fixed list ``OTHER_FOLDERS`` below, each
saying what it holds (docs/tests.md has the same rule). ``tests/`` itself holds only
``conftest.py`` (fixtures shared by all); helpers that are not tests live in ``tests/support/``
(a package: ``from support import servers``). Test folders have no ``__init__.py``, so pytest
imports each test module by its file name: the names stay unique across folders.
"""

from __future__ import annotations

import collections
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"

# The folders that mirror no qlora_kfp subpackage, and what goes in each.
OTHER_FOLDERS = {
    "core": "qlora_kfp's top-level modules (configs.py, env.py, errors.py, preflight.py) and "
    "whole-project rules (import layers, docs, packaging, this layout)",
    "components": "components/ (the generated component modules)",
    "pipelines": "pipelines/ (compiling, the golden YAML, pod settings, what the KFP backend "
    "and API server do with them: cache keys, the backend contract, each release's protos)",
    "manifests": "manifests/ (deploy, Istio, KServe, MLflow, owner and admin parts, quota, RBAC)",
    "images": "images/ (the Dockerfiles)",
    "backend": "backend/ (the real kube-apiserver and Kubeflow Trainer harnesses themselves)",
    "bench": "bench/ (the benchmark harness, on the CPU)",
    "e2e": "whole-pipeline runs (kfp.local, the tracking servers, the sweep)",
}
SUPPORT = "support"  # helpers, never tests


def library_folders(root: Path = ROOT) -> dict[str, str]:
    """``tests/<name>/`` for each subpackage of qlora_kfp: what it holds."""
    return {
        p.parent.name: f"qlora_kfp/{p.parent.name}/"
        for p in sorted((root / "qlora_kfp").glob("*/__init__.py"))
    }


def where_it_goes(name: str, root: Path = ROOT) -> str:
    """The folder a test file named ``name`` most likely belongs in, and the whole rule."""
    stem = name.removeprefix("test_").removesuffix(".py")
    guesses = [f"tests/{p.parent.name}/" for p in sorted((root / "qlora_kfp").glob(f"*/{stem}.py"))]
    if (root / "qlora_kfp" / f"{stem}.py").exists():
        guesses.append("tests/core/")
    for top in ("components", "pipelines", "bench"):
        if (root / top / f"{stem}.py").exists():
            guesses.append(f"tests/{top}/")
    folders = {**library_folders(root), **OTHER_FOLDERS}
    rule = "; ".join(f"tests/{k}/: {v}" for k, v in folders.items())
    guess = f"probably {' or '.join(guesses)} (the module it names); " if guesses else ""
    return f"{guess}the folders: {rule} (docs/tests.md)"


def layout_problems(tests: Path = TESTS, root: Path = ROOT) -> list[str]:
    """Each file of ``tests`` that breaks the rule, with where it goes."""
    allowed = {**library_folders(root), **OTHER_FOLDERS}
    problems = []
    for path in sorted(tests.rglob("*.py")):
        rel = path.relative_to(tests)
        if "__pycache__" in rel.parts:
            continue
        top = rel.parts[0]
        if len(rel.parts) == 1:
            if path.name == "conftest.py":
                continue
            if path.name.startswith("test_"):
                problems.append(
                    f"tests/{rel}: no test sits in tests/ itself: {where_it_goes(path.name, root)}"
                )
            else:
                problems.append(
                    f"tests/{rel}: a helper goes in tests/{SUPPORT}/ (from support import ...)"
                )
        elif top == SUPPORT:
            if path.name.startswith("test_") or path.name == "conftest.py":
                problems.append(f"tests/{rel}: tests/{SUPPORT}/ holds helpers, never tests")
        elif top not in allowed:
            problems.append(
                f"tests/{rel}: tests/{top}/ mirrors no qlora_kfp subpackage and is not one of the "
                f"other folders: {where_it_goes(path.name, root)}"
            )
        elif len(rel.parts) > 2:
            problems.append(f"tests/{rel}: test files sit directly in tests/{top}/, no deeper")
        elif path.name == "__init__.py":
            problems.append(
                f"tests/{rel}: test folders are no packages (pytest imports test modules by file "
                "name; a package named like components/ or pipelines/ would shadow the project's)"
            )
        elif not (path.name.startswith("test_") or path.name == "conftest.py"):
            problems.append(
                f"tests/{rel}: a helper goes in tests/{SUPPORT}/ (from support import ...)"
            )
    names = collections.defaultdict(list)
    for path in tests.glob("*/test_*.py"):
        names[path.name].append(path.relative_to(tests).as_posix())
    for name, paths in sorted(names.items()):
        if len(paths) > 1:
            problems.append(f"{name} is in {sorted(paths)}: test file names stay unique")
    return problems


def test_every_test_file_sits_in_the_folder_of_what_it_tests():
    problems = layout_problems()
    assert problems == [], "\n".join(problems)


def test_each_other_folder_is_no_subpackage_name():
    """The fixed folders never take a name a qlora_kfp subpackage has (or could be read as)."""
    assert set(OTHER_FOLDERS) & set(library_folders()) == set()
    assert SUPPORT not in {**OTHER_FOLDERS, **library_folders()}


def test_a_misplaced_test_says_where_it_goes(tmp_path):
    (tmp_path / "qlora_kfp" / "storage").mkdir(parents=True)
    (tmp_path / "qlora_kfp" / "storage" / "__init__.py").touch()
    (tmp_path / "qlora_kfp" / "storage" / "s3.py").touch()
    tests = tmp_path / "tests"
    for rel in ["conftest.py", "test_s3.py", "utils/test_misc.py", "storage/test_s3.py", "kube.py"]:
        (tests / rel).parent.mkdir(parents=True, exist_ok=True)
        (tests / rel).touch()
    problems = layout_problems(tests, tmp_path)
    assert problems[0].startswith("tests/kube.py: a helper goes in tests/support/")
    assert problems[1].startswith(
        "tests/test_s3.py: no test sits in tests/ itself: probably tests/storage/"
    )
    assert problems[2].startswith(
        "tests/utils/test_misc.py: tests/utils/ mirrors no qlora_kfp subpackage"
    )
    assert "tests/storage/: qlora_kfp/storage/" in problems[2]
    assert "tests/e2e/: whole-pipeline runs" in problems[2]
    assert len(problems) == 3
