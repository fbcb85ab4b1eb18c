"""Compile every pipeline to YAML, byte-for-byte reproducibly (the golden files)."""

from __future__ import annotations

from pathlib import Path


def pipelines() -> dict:
    """``{file stem: pipeline function}`` of every pipeline the project ships."""
    from qlora_kfp.pipelines.qlora_finetune import qlora_finetune
    from qlora_kfp.pipelines.qlora_sweep import qlora_sweep

    return {"qlora_finetune": qlora_finetune, "qlora_sweep": qlora_sweep}


def compile_all(output_dir: str | Path = "pipelines/compiled") -> list[str]:
    """Compile each pipeline to ``<output_dir>/<name>.yaml``; returns the written paths."""
    from kfp import compiler

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fn in pipelines().items():
        path = out / f"{name}.yaml"
        compiler.Compiler().compile(fn, str(path))
        written.append(str(path))
    return written
