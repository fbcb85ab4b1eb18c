"""Every environment variable the project reads is read through ``qlora_kfp/env.py`` and
listed in its table, with its default and meaning.

The check reads the source (ast): a call of ``os.environ.get``/``os.getenv``, an
``os.environ[...]`` read, ``... in os.environ`` and ``os.environ.items()``-like reads outside
``env.py`` fail, naming the file, the line and the variable; so does an accessor call
(``env.text("X")``) whose name the table does not list. Writes to ``os.environ`` (handing a
setting on to MLflow or a subprocess) are not reads.
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest

from qlora_kfp import env
from qlora_kfp.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [ROOT / "qlora_kfp", ROOT / "components", ROOT / "pipelines"]
ACCESSORS = {"text", "integer", "path", "present", "default", "var"}
READ_METHODS = {"get", "items", "keys", "values"}  # on os.environ


def _is_environ(node: ast.AST, aliases: set[str]) -> bool:
    """``os.environ``, or a name ``from os import environ`` bound."""
    if isinstance(node, ast.Attribute):
        return node.attr == "environ" and isinstance(node.value, ast.Name) and node.value.id == "os"
    return isinstance(node, ast.Name) and node.id in aliases


def _constants(files: list[Path]) -> dict[Path, dict[str, str]]:
    """Module-level ``NAME = "text"`` constants of each file (``RUN_ID_ENV = "KFP_RUN_ID"``)."""
    out = {}
    for path in files:
        found = {}
        for node in ast.parse(path.read_text()).body:
            if (
                isinstance(node, ast.Assign)
                and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)
            ):
                for t in node.targets:
                    if isinstance(t, ast.Name):
                        found[t.id] = node.value.value
        out[path] = found
    return out


def _name(node: ast.AST | None, own: dict[str, str], anywhere: dict[str, str]) -> str | None:
    """The variable a read names: a literal, or a constant of this module or of another
    (``report.WEBHOOK_ENV``); None when the code computes it."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name):
        return own.get(node.id) or anywhere.get(node.id)
    if isinstance(node, ast.Attribute):
        return anywhere.get(node.attr)
    return None


def _environ_read(node: ast.AST, aliases: set[str]) -> tuple[bool, ast.AST | None]:
    """Whether ``node`` reads the environment, and the expression naming the variable."""
    if isinstance(node, ast.Call):
        f, arg = node.func, (node.args[0] if node.args else None)
        if (
            isinstance(f, ast.Attribute)
            and f.attr in READ_METHODS
            and _is_environ(f.value, aliases)
        ):
            return True, arg if f.attr == "get" else None
        os_getenv = isinstance(f, ast.Attribute) and f.attr == "getenv"
        os_getenv = os_getenv and isinstance(f.value, ast.Name) and f.value.id == "os"
        if os_getenv or (isinstance(f, ast.Name) and f.id == "getenv" and "getenv" in aliases):
            return True, arg
    if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
        return _is_environ(node.value, aliases), node.slice
    if isinstance(node, ast.Compare) and any(isinstance(o, (ast.In, ast.NotIn)) for o in node.ops):
        return any(_is_environ(c, aliases) for c in node.comparators), node.left
    return False, None


def _accessor_arg(node: ast.AST) -> ast.AST | None:
    """The name argument of an ``env.<accessor>(...)`` call (None for any other node)."""
    if isinstance(node, ast.Call) and node.args:
        f = node.func
        env_call = isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name)
        if env_call and f.value.id == "env" and f.attr in ACCESSORS:
            return node.args[0]
    return None


def problems(sources: list[Path] = SOURCES, listed: dict = env.VARS) -> list[str]:
    """Reads of the environment outside ``env.py``, and accessor calls naming an unlisted
    variable: ``"path:line: ..."`` each."""
    files = {p: folder for folder in sources for p in sorted(folder.rglob("*.py"))}
    consts = _constants(list(files))
    anywhere: dict[str, str] = {}
    for found in consts.values():
        anywhere.update(found)
    out = []
    for path, folder in files.items():
        tree = ast.parse(path.read_text())
        own = consts[path]
        where = path.relative_to(folder.parent).as_posix()
        is_env_module = path == folder / "env.py" and folder.name == "qlora_kfp"
        aliases = {
            a.asname or a.name
            for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom) and n.module == "os"
            for a in n.names
            if a.name in ("environ", "getenv")
        }
        for node in ast.walk(tree):
            reads, arg = _environ_read(node, aliases)
            if reads and not is_env_module:
                name = _name(arg, own, anywhere) or "the environment"
                out.append(f"{where}:{node.lineno}: reads {name} outside qlora_kfp/env.py")
            name = _name(_accessor_arg(node), own, anywhere)
            if name is not None and name not in listed:
                out.append(f"{where}:{node.lineno}: reads {name}, not listed in env.py")
    return out


def test_every_read_goes_through_env_and_is_listed():
    assert problems() == [], "read it with qlora_kfp.env (and list it in VARS)"


@pytest.mark.parametrize(
    "line,found",
    [
        pytest.param('X = os.environ.get("QLORA_KFP_NEW", "1")', "QLORA_KFP_NEW", id="get"),
        pytest.param('X = os.getenv("QLORA_KFP_NEW")', "QLORA_KFP_NEW", id="getenv"),
        pytest.param('X = os.environ["QLORA_KFP_NEW"]', "QLORA_KFP_NEW", id="subscript"),
        pytest.param('X = "QLORA_KFP_NEW" in os.environ', "QLORA_KFP_NEW", id="in"),
        pytest.param(
            'NEW_ENV = "QLORA_KFP_NEW"\ndef f():\n    return os.environ.get(NEW_ENV)',
            "QLORA_KFP_NEW",
            id="constant",
        ),
        pytest.param(
            "def f():\n    return [k for k in os.environ.keys()]", "the environment", id="keys"
        ),
    ],
)
def test_the_check_catches_a_read_outside_env(tmp_path, line, found):
    pkg = tmp_path / "qlora_kfp"
    pkg.mkdir()
    (pkg / "stray.py").write_text(f"import os\n\n{line}\n")
    (pkg / "writes.py").write_text(  # writes and pass-through copies are not reads
        'import os\nos.environ["A"] = "1"\nos.environ.setdefault("B", "2")\nE = {**os.environ}\n'
    )
    out = problems([pkg])
    assert len(out) == 1 and out[0].startswith("qlora_kfp/stray.py:") and found in out[0], out


def test_the_check_catches_an_unlisted_name(tmp_path):
    pkg = tmp_path / "qlora_kfp"
    pkg.mkdir()
    (pkg / "env.py").write_text('import os\nX = os.environ.get("ANY")\n')  # env.py may read
    (pkg / "user.py").write_text(
        'from qlora_kfp import env\nA = env.text("QLORA_KFP_CACHE")\nB = env.integer("NOPE")\n'
    )
    assert problems([pkg]) == ["qlora_kfp/user.py:3: reads NOPE, not listed in env.py"]


def test_the_table():
    names = [v.name for v in env._TABLE]
    assert len(names) == len(set(names)), "a variable is listed twice"
    for v in env.VARS.values():
        assert re.fullmatch(r"[A-Z][A-Z0-9_]*", v.name), v.name
        assert v.help and "\n" not in v.help and "|" not in v.help, v.name
        assert v.type in (str, int, float, Path), v.name
        assert set(filter(None, v.when.split(","))) <= set(env.WHEN), v.name
        assert bool(v.when) == v.read, f"{v.name}: say when it is read, and only if it is"
        assert v.read or v.owner != env.PROJECT, f"{v.name}: the project's own, never read"
        for other in re.findall(r"\{(\w+)\}", v.default):
            assert other in env.VARS, f"{v.name}'s default names {other}"
        if v.default and v.type is int:
            int(v.default)


def test_every_variable_read_is_named_in_the_code():
    """A variable listed as read that no module names any more is stale."""
    text = "\n".join(
        p.read_text()
        for folder in SOURCES
        for p in folder.rglob("*.py")
        if p != ROOT / "qlora_kfp" / "env.py"
    )
    assert [n for n, v in env.VARS.items() if v.read and n not in text] == []


@pytest.mark.parametrize(
    "name,value,accessor,expected",
    [
        ("QLORA_KFP_TAG", None, env.text, "0.1.0"),
        ("QLORA_KFP_TAG", "1.2", env.text, "1.2"),
        ("QLORA_KFP_SCRATCH_SIZE", "", env.text, ""),  # "" means no limit: kept
        ("QLORA_KFP_ARTIFACT_URI", None, env.text, ""),
        ("KFP_PROXY_NAMESPACE", None, env.text, "kubeflow"),
        ("KFP_PROXY_NAMESPACE", "", env.text, "kubeflow"),  # blank counts as unset
        ("KFP_PROXY_NAMESPACE", "kfp", env.text, "kfp"),
        ("QLORA_KFP_GPUS", None, env.integer, 1),
        ("QLORA_KFP_GPUS", "4", env.integer, 4),
        ("QLORA_KFP_GPUS", "", env.integer, 1),
        ("WORLD_SIZE", None, env.integer, 1),
        ("RANK", "3", env.integer, 3),
        ("QLORA_KFP_CACHE", "/data/c", env.path, Path("/data/c")),
        ("QLORA_KFP_CACHE", None, env.path, Path.home() / ".cache" / "qlora-kfp"),
        ("QLORA_KFP_CACHE", "", env.path, Path.home() / ".cache" / "qlora-kfp"),  # not the cwd
        ("LOCAL_RANK", None, env.present, False),
        ("LOCAL_RANK", "", env.present, True),
    ],
)
def test_accessors(monkeypatch, name, value, accessor, expected):
    if value is None:
        monkeypatch.delenv(name, raising=False)
    else:
        monkeypatch.setenv(name, value)
    assert accessor(name) == expected


def test_a_default_may_name_another_variable(monkeypatch):
    for name in ("QLORA_KFP_CPU_IMAGE", "QLORA_KFP_REGISTRY", "QLORA_KFP_TAG"):
        monkeypatch.delenv(name, raising=False)
    assert env.text("QLORA_KFP_CPU_IMAGE") == "ghcr.io/qlora-kfp/qlora-kfp-cpu:0.1.0"
    monkeypatch.setenv("QLORA_KFP_REGISTRY", "registry.local/me")
    assert env.text("QLORA_KFP_CPU_IMAGE") == "registry.local/me/qlora-kfp-cpu:0.1.0"
    monkeypatch.setenv("QLORA_KFP_CPU_IMAGE", "cpu@sha256:abc")
    assert env.text("QLORA_KFP_CPU_IMAGE") == "cpu@sha256:abc"


def test_a_mapping_may_stand_for_the_environment():
    assert env.text("KFP_HOST", {"KFP_HOST": "http://kfp"}) == "http://kfp"
    assert env.integer("QLORA_KFP_GPU_RETRIES", {}) == 3


def test_a_bad_number_names_the_variable(monkeypatch):
    monkeypatch.setenv("QLORA_KFP_GPU_RETRIES", "three")
    with pytest.raises(ConfigError, match=r"QLORA_KFP_GPU_RETRIES='three': give a whole number"):
        env.integer("QLORA_KFP_GPU_RETRIES")


def test_an_unlisted_name_is_refused():
    with pytest.raises(KeyError, match="QLORA_KFP_NOPE is not listed in qlora_kfp/env.py"):
        env.text("QLORA_KFP_NOPE")


def test_the_test_processes_run_one_openmp_thread():
    """`make test` runs a worker a core beside training processes and pipeline tasks; torch's
    default, a thread a core, made each process's OpenMP team spin-wait for cores the others
    held (a training test measured 4x slower under load). tests/conftest.py sets one."""
    import torch

    assert os.environ["OMP_NUM_THREADS"] == "1"
    assert torch.get_num_threads() == 1
