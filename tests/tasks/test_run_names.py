"""A run on the user's data is named after what it did, on which data, when; not
`delicate-gnu-839`."""

from __future__ import annotations

import re

import pytest

from qlora_kfp.tracking import parent_run


@pytest.mark.parametrize(
    "source, stem",
    [
        ("s3://bucket/exports/support-chats.jsonl", "support-chats"),
        ("/data/chats.jsonl.gz", "chats"),
        ("/data/chat-folder/", "chat-folder"),
        ("org/alpaca-cleaned", "alpaca-cleaned"),
        ("train.v2.csv", "train.v2"),
    ],
)
def test_default_run_name(source, stem):
    from qlora_kfp.tasks.bookkeeping_tasks import default_run_name

    name = default_run_name("qlora-finetune", source)
    assert re.fullmatch(rf"qlora-finetune-{re.escape(stem)}-\d{{8}}-\d{{4}}", name), name


def test_an_unnamed_run_gets_the_pipeline_dataset_and_time(local_mlflow):
    from qlora_kfp.tasks import bookkeeping_tasks

    args = {
        "mlflow_experiment": "names",
        "kfp_run_id": "run-1",
        "base_model": "m",
        "data_source": "s3://b/support-chats.jsonl",
        "pipeline_name": "qlora-sweep",
    }
    unnamed = bookkeeping_tasks.start_tracking({**args, "run_name": ""})
    named = bookkeeping_tasks.start_tracking({**args, "run_name": "nightly", "kfp_run_id": "run-2"})
    name = parent_run.client().get_run(unnamed).info.run_name
    assert re.fullmatch(r"qlora-sweep-support-chats-\d{8}-\d{4}", name), name
    assert parent_run.client().get_run(named).info.run_name == "nightly"  # a given name is kept
