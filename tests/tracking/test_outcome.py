"""The exit handler's state, on every runner, to one outcome (tracking/outcome.py).

The backend says COMPLETE/CACHED/FAILED/CANCELED (the MLMD state; never SUCCEEDED) and,
before 2.17, RUNNING when the exit group holds an If or ParallelFor; kfp.local says SUCCEEDED.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from qlora_kfp.tasks.bookkeeping_tasks import finish_tracking
from qlora_kfp.tracking import outcome, parent_run, stage_runs

DONE = {"prepare-dataset": "FINISHED", "train": "FINISHED", "register": "FINISHED"}
CASES = [
    ("local-succeeded", "SUCCEEDED", {}, False, "SUCCEEDED"),
    ("backend-complete", "COMPLETE", {}, False, "SUCCEEDED"),
    ("backend-cached", "CACHED", {}, False, "SUCCEEDED"),
    ("backend-failed", "FAILED", DONE, False, "FAILED"),
    ("backend-canceled", "CANCELED", {}, False, "CANCELED"),
    ("sdk-cancelled-spelling", "CANCELLED", {}, False, "CANCELED"),
    ("running-every-stage-done", "RUNNING", DONE, False, "SUCCEEDED"),
    ("running-skipped-training", "RUNNING", {"decide-training": "FINISHED"}, True, "SUCCEEDED"),
    ("running-a-stage-failed", "RUNNING", {**DONE, "train": "FAILED"}, False, "FAILED"),
    ("running-a-stage-never-ended", "RUNNING", {"train": "RUNNING"}, False, "FAILED"),
    ("running-before-the-last-stage", "RUNNING", {"train": "FINISHED"}, False, "FAILED"),
    ("running-sweep-done", "RUNNING", {"pick-best-trial": "FINISHED"}, False, "SUCCEEDED"),
    ("unknown-word-no-tracking", "", {}, False, "FAILED"),
]


@pytest.mark.parametrize(
    "state,stages,skipped,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_every_runner_state_maps_to_one_outcome(state, stages, skipped, expected):
    got, reason = outcome.resolve(state, stages, skipped)
    assert got == expected and state in reason


def _run_with_stages(kfp_run_id: str, failing: str = "") -> str:
    parent = parent_run.start_pipeline_run("exp", "r", {"kfp.run_id": kfp_run_id})
    for stage in ("prepare-dataset", "train", "register"):
        try:
            with stage_runs.stage_run(parent, stage):
                if stage == failing:
                    raise RuntimeError("train failed: loss is nan at step 7")
        except RuntimeError:
            break
    return parent


@pytest.mark.parametrize(
    "state,failing,status",
    [
        pytest.param("COMPLETE", "", "FINISHED", id="complete-finishes-the-parent"),
        pytest.param("CACHED", "", "FINISHED", id="cached-finishes-the-parent"),
        pytest.param("CANCELED", "", "KILLED", id="canceled-kills-the-parent"),
        pytest.param("RUNNING", "", "FINISHED", id="running-but-every-stage-done"),
        pytest.param("RUNNING", "train", "FAILED", id="running-with-a-failed-stage"),
    ],
)
def test_exit_handler_closes_the_parent_by_outcome(local_mlflow, state, failing, status):
    parent = _run_with_stages("run-7", failing)
    out = local_mlflow / "report.md"
    # The backend's final status carries no error message.
    finish_tracking(
        {
            "mlflow_experiment": "exp",
            "kfp_run_id": "run-7",
            "status": SimpleNamespace(state=state, error_message=None),
            "report": SimpleNamespace(path=str(out)),
        }
    )
    run = parent_run.client().get_run(parent)
    assert run.info.status == status
    assert run.data.tags["kfp.state"] == state
    text = out.read_text()
    if failing:  # the failed stage's own reason stands in for the missing error message
        assert "run-7: FAILED" in text and "train failed: loss is nan at step 7" in text
    elif status == "KILLED":
        assert "run-7: CANCELED" in text
    else:
        assert "run-7: SUCCEEDED" in text and "Failure" not in text


def test_a_retried_stage_counts_by_its_newest_attempt(local_mlflow):
    """A preempted attempt never closes its run (the pod died); the retry that finished is
    what counts, or every run that needed a GPU retry would be closed FAILED on 2.14-2.16."""
    import time

    from qlora_kfp.tracking import stage_runs

    parent = parent_run.start_pipeline_run("exp", "r", {"kfp.run_id": "run-8"})
    exp = parent_run.client().get_run(parent).info.experiment_id
    parent_run.client().create_run(  # what stage_run opened before the pod was killed
        exp, tags={"mlflow.parentRunId": parent, "stage": "train", "kfp.run_id": "run-8"}
    )
    time.sleep(0.05)
    for stage in ("train", "register"):
        with stage_runs.stage_run(parent, stage):
            pass
    statuses = stage_runs.stage_statuses(parent)
    assert statuses["train"][0] == "FINISHED"
    got, _ = outcome.resolve("RUNNING", {k: v for k, (v, _) in statuses.items()})
    assert got == "SUCCEEDED"
