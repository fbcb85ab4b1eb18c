"""What the tests share that is not a test: servers, fakes and harnesses (``from support import
servers``; tests/conftest.py puts tests/ on the path)."""

# The stages of a qlora_finetune run that log a nested MLflow run under the pipeline's parent
# (their "stage" tag): what the end-to-end tests expect to find.
NESTED_STAGE_RUNS = frozenset(
    {
        "prepare-dataset",
        "decide-training",
        "preflight",
        "quantize",
        "train",
        "evaluate",
        "merge",
        "register",
    }
)
