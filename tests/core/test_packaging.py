"""Installing the project is quiet: setuptools finds nothing to warn about in pyproject.toml."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_building_the_wheel_warns_about_nothing_and_ships_the_compiled_pipelines(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("qlora_kfp", "components", "pipelines"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    build = (
        "import sys; from setuptools import build_meta as b; "
        "print('WHEEL', b.build_wheel(sys.argv[1]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", build, str(tmp_path / "dist")],
        cwd=src,
        capture_output=True,
        text=True,
        check=True,
    )
    said = out.stdout + out.stderr
    assert "Warning" not in said, said[-3000:]
    wheel = tmp_path / "dist" / said.split("WHEEL ")[1].split()[0]
    names = zipfile.ZipFile(wheel).namelist()
    assert "qlora_kfp/pipelines/compiled/qlora_finetune.yaml" in names
    assert "qlora_kfp/components/train.py" in names
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    assert "License-Expression: Apache-2.0" in zipfile.ZipFile(wheel).read(meta).decode()


def test_make_manifests_writes_only_yaml(tmp_path):
    """`make manifests > overlay.yaml` must be a valid file: make echoes no command into it."""
    import os

    import yaml

    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    out = subprocess.run(
        ["make", "manifests"], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    ).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    assert docs and all(isinstance(d, dict) and "kind" in d for d in docs)
