"""Helpers for the ``qlora-kfp upload | run-remote | schedule`` tests: a clean KFP client
environment and a way to run the CLI and read the JSON it prints."""

from __future__ import annotations

import json
from pathlib import Path

from qlora_kfp.app import cli

PACKAGE = str(Path(__file__).resolve().parents[2] / "pipelines/compiled/qlora_finetune.yaml")
REQUIRED = ["--param", "base_model=s3://models/llama", "--param", "data_source=s3://d/x.jsonl"]
KFP_ENV = (
    "KFP_HOST",
    "KFP_TOKEN",
    "KFP_NAMESPACE",
    "KFP_PROXY_NAMESPACE",
    "KFP_UI_URL",
    "KFP_SERVICE_ACCOUNT",
    "KF_PIPELINES_ENDPOINT",
    "KF_PIPELINES_UI_ENDPOINT",
)


def isolate(monkeypatch, tmp_path) -> None:
    """No KFP variable of the developer's, and no ~/.config/kfp/context.json either (the
    client reads a namespace from it)."""
    import kfp

    for var in KFP_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(kfp.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context.json"))


def run(capsys, *args) -> tuple[int, object, str]:
    """``qlora-kfp ARGS``: ``(exit code, the JSON it printed or None, stderr)``."""
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    # the JSON document is the last thing printed (kfp.Client helpers print links first)
    starts = [i for i in (captured.out.find("{"), captured.out.find("[")) if i >= 0]
    out = json.loads(captured.out[min(starts) :]) if code == 0 and starts else None
    return code, out, captured.err
