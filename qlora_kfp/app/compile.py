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
        path.write_text(_stable_header(path.read_text()))
        written.append(str(path))
    return written


def _sorted(value):
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted(v) for v in value]
    return value


def _stable_header(text: str) -> str:
    """KFP's header comment prints dict defaults in protobuf map order, which changes from
    process to process; sort them so compiling twice gives the same bytes."""
    import ast
    import re

    def fix(m: re.Match) -> str:
        try:
            return f"[Default: {_sorted(ast.literal_eval(m.group(1)))}]"
        except (ValueError, SyntaxError):
            return m.group(0)

    lines = text.split("\n")
    for i, line in enumerate(lines):
        if not line.startswith("#"):
            break  # only the header comment
        lines[i] = re.sub(r"\[Default: (.*)\]$", fix, line)
    return "\n".join(lines)
