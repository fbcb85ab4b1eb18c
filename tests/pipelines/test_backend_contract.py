"""What the project relies on from the KFP backend's driver and launcher, one test each.

Each test names the behaviour, cites where kubeflow/pipelines implements it (read at tag
2.17.0, and 2.14.0 where older backends differ) and checks the compiled YAML, or the code
that depends on it, against it. The API server's side is in ``tests/pipelines/test_kfp_api_contract.py``;
the cache key in ``tests/pipelines/test_cache_keys.py``; the exit handler's state words in
``tests/tracking/test_outcome.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PIPELINES = ["qlora_finetune", "qlora_sweep"]


def compiled(name: str) -> tuple[dict, dict]:
    spec, platform = yaml.safe_load_all((ROOT / "pipelines/compiled" / f"{name}.yaml").read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def tasks(spec: dict) -> dict[str, tuple[dict, dict]]:
    """``{task name: (task spec, component)}`` over every DAG of the pipeline."""
    out = {}
    for comp in [spec["root"], *spec["components"].values()]:
        for name, t in comp.get("dag", {}).get("tasks", {}).items():
            out[name] = (t, spec["components"][t["componentRef"]["name"]])
    return out


@pytest.mark.parametrize("name", PIPELINES)
def test_every_pod_learns_its_run_id_from_the_pipeline_runid_label(name):
    """backend/src/apiserver/template/v2_template.go sets the label ``pipeline/runid`` on every
    pod of a run (``SetPodMetadataLabels``, since 2.14); driver/k8s.go turns a
    ``fieldPathAsEnv`` into a downward-API env var. Cached tasks have no other way to learn
    which run they belong to."""
    spec, executors = compiled(name)
    for task, (_, comp) in tasks(spec).items():
        if "executorLabel" not in comp:
            continue
        env = executors[comp["executorLabel"]].get("fieldPathAsEnv", [])
        assert {"name": "KFP_RUN_ID", "fieldPath": "metadata.labels['pipeline/runid']"} in env, task


@pytest.mark.parametrize("name", PIPELINES)
def test_big_artifacts_are_not_inputs_of_bookkeeping_tasks(name):
    """backend/src/v2/component/launcher_v2.go ``downloadArtifacts`` downloads every input
    artifact in full before the user code starts; a task that only needs to know where the
    merged model is (``register-model``) must get its URI, not the artifact."""
    spec, _ = compiled(name)
    for task, (t, _) in tasks(spec).items():
        arts = t.get("inputs", {}).get("artifacts", {})
        producers = {
            a.get("taskOutputArtifact", {}).get("producerTask", a.get("componentInputArtifact"))
            for a in arts.values()
        }
        if task in ("register-model", "decide-training", "pick-best-trial", "finish-tracking"):
            assert not arts, f"{task} downloads {sorted(arts)}"
        assert not any("merge" in str(p) for p in producers), task


@pytest.mark.parametrize("name", PIPELINES)
def test_cached_tasks_wait_for_the_parent_run_they_report_under(name):
    """A cached task takes no input from start-tracking (it would be in its cache key), so only
    ``dependentTasks`` (driver: a task starts after them; not part of the cache key,
    cacheutils/cache.go) keeps it from looking for the parent run before it exists."""
    spec, _ = compiled(name)
    t, _ = tasks(spec)["prepare-dataset"]
    assert "start-tracking" in t["dependentTasks"]
