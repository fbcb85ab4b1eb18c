"""Fixtures of the training tests."""

from __future__ import annotations

import pytest
from support.kfp_task_pod import task_pod


@pytest.fixture
def pod(monkeypatch) -> dict:
    """The train task's pod as the API server returns it (a uid added): the TrainJob's and the
    PyTorchJob's nodes are made like it (test_trainjob.py, test_pytorchjob.py)."""
    monkeypatch.setenv("KFP_RUN_ID", "run-1")
    pod = task_pod("team-a")
    pod["metadata"]["uid"] = "0a1b2c3d-0000-4000-8000-000000000001"
    return pod


@pytest.fixture(scope="module")
def batch(prepared):
    """Four of the demo's training rows in one padding-free batch (the LoRA-path and
    checkpointing tests run the model on it)."""
    from transformers import AutoTokenizer

    from qlora_kfp.storage.artifacts import token_rows
    from qlora_kfp.training import batching

    tok = AutoTokenizer.from_pretrained(f"{prepared.path}/tokenizer")
    return batching.make_collator("padding_free", tok)(token_rows(prepared.path, "train")[:4])
