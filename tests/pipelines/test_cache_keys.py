"""Cached tasks hit the backend's cache when a second run has the same data and settings.

The cache key is computed from the compiled YAML the way the KFP backend's driver computes it
(``tests/support/kfp_backend.py``): every input parameter value counts, so a cached task may take only
inputs that describe its work, never the run's id or its MLflow parent run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from support.kfp_backend import BackendRun

ROOT = Path(__file__).resolve().parents[2]
PIPELINES = ["qlora_finetune", "qlora_sweep"]
CACHED = ["prepare-dataset", "quantize"]


def compiled(name: str) -> tuple[dict, dict]:
    spec, platform = yaml.safe_load_all((ROOT / "pipelines/compiled" / f"{name}.yaml").read_text())
    return spec, platform["platforms"]["kubernetes"]


def simulated_run(name: str, run_id: str, fingerprint: str = "fp-1", **params) -> BackendRun:
    """A run whose per-run values (run id, MLflow parent run) are its own and whose content
    values (fingerprint, digest, artifacts of cached producers) are ``fingerprint``'s."""
    spec, platform = compiled(name)
    required = {"base_model": "s3://models/llama", "data_source": "s3://data/train.jsonl"}
    return BackendRun(
        spec,
        platform,
        params={**required, **params},
        run_id=run_id,
        outputs={
            "start-tracking": {"Output": f"mlflow-parent-of-{run_id}"},
            "fingerprint-sources": {"Output": fingerprint},
            "preflight": {"Output": "{}"},
            "prepare-dataset": {"Output": f"digest-of-{fingerprint}"},
            "decide-training": {"Output": "train"},
        },
        # A cache hit hands on the cached execution's artifacts (driver/cache.go
        # reuseCachedOutputs), so the dataset artifact's MLMD name is the first run's.
        artifacts={"prepare-dataset": {"dataset": f"artifact-dataset-{fingerprint}"}},
    )


@pytest.mark.parametrize("name", PIPELINES)
def test_the_cached_tasks_are_prepare_and_quantize(name):
    run = simulated_run(name, "run-a")
    spec = run.spec
    tasks = [
        t
        for comp in [spec["root"], *spec["components"].values()]
        for t in comp.get("dag", {}).get("tasks", {})
    ]
    assert sorted(t for t in tasks if run.caching_enabled(t)) == sorted(CACHED)


@pytest.mark.parametrize("task", CACHED)
@pytest.mark.parametrize("name", PIPELINES)
def test_a_second_run_with_the_same_data_and_settings_hits_the_cache(name, task):
    first, second = simulated_run(name, "run-a"), simulated_run(name, "run-b")
    assert first.fingerprint(task) == second.fingerprint(task), _diff(first, second, task)


@pytest.mark.parametrize("task", CACHED)
@pytest.mark.parametrize("name", PIPELINES)
def test_no_per_run_value_reaches_a_cached_task(name, task):
    run = simulated_run(name, "run-unique-7")
    values, _ = run.inputs(task)
    assert not any("run-unique-7" in str(v) for v in values.values()), values


@pytest.mark.parametrize(
    "task,change",
    [
        ("prepare-dataset", {"fingerprint": "fp-new-data"}),
        ("prepare-dataset", {"max_seq_length": 1024}),
        ("quantize", {"fingerprint": "fp-new-data"}),
        ("quantize", {"quant_type": "fp4"}),
    ],
    ids=["prepare-new-data", "prepare-new-setting", "quantize-new-data", "quantize-new-setting"],
)
def test_new_data_or_settings_miss_the_cache(task, change):
    base = simulated_run("qlora_finetune", "run-a")
    changed = simulated_run("qlora_finetune", "run-b", **change)
    assert base.fingerprint(task) != changed.fingerprint(task)


def _diff(a: BackendRun, b: BackendRun, task: str) -> str:
    ka, kb = a.cache_key(task)["inputParameterValues"], b.cache_key(task)["inputParameterValues"]
    return "inputs that differ: " + ", ".join(k for k in ka if ka[k] != kb.get(k))
