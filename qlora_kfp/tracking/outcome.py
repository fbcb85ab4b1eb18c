"""What a pipeline run's exit handler is told, and what the run really did.

The exit handler receives ``PipelineTaskFinalStatus.state``. Its words differ by runner:

* ``kfp.local`` says ``SUCCEEDED`` or ``FAILED``
  (kfp/local/orchestrator/orchestrator_utils.py).
* The KFP backend hands over the producer execution's MLMD state name
  (kubeflow/pipelines backend/src/v2/driver/resolve.go, ``TaskFinalStatus``:
  ``execution.GetExecution().LastKnownState.String()``): ``COMPLETE``, ``CACHED``, ``FAILED``
  or ``CANCELED``, never ``SUCCEEDED``, and an empty error message. Before 2.17, when the
  exit-handler group holds a ``dsl.If`` or ``dsl.ParallelFor`` (ours do), the group's
  execution is still ``RUNNING`` when the exit handler starts.

:func:`resolve` maps every word to one outcome; where the word cannot tell (``RUNNING``, an
unknown word), it reads what the run left behind: its stage runs in MLflow.
"""

from __future__ import annotations

from collections.abc import Mapping

SUCCEEDED, FAILED, CANCELED = "SUCCEEDED", "FAILED", "CANCELED"
WORDS = {
    "SUCCEEDED": SUCCEEDED,  # kfp.local
    "COMPLETE": SUCCEEDED,  # backend: the group's execution completed
    "CACHED": SUCCEEDED,  # backend: every task of the group came from the cache
    "FAILED": FAILED,
    "CANCELED": CANCELED,  # backend (MLMD spelling)
    "CANCELLED": CANCELED,  # the SDK's docstring spelling
}
# MLflow run status for each outcome.
MLFLOW_STATUS = {SUCCEEDED: "FINISHED", FAILED: "FAILED", CANCELED: "KILLED"}
# A run is complete when one of these stage runs finished (register: trained and registered;
# decide-training alone: skipped because the data did not change; pick-best-trial: a sweep).
LAST_STAGES = ("register", "pick-best-trial")


def resolve(state: str, stages: Mapping[str, str], skipped: bool = False) -> tuple[str, str]:
    """The run's outcome and how it was decided.

    Args:
        state: ``PipelineTaskFinalStatus.state`` as the exit handler got it.
        stages: ``{stage: MLflow status}`` of the run's stage runs (empty without tracking).
        skipped: The training decision was to skip (no GPU stage was meant to run).

    Returns:
        ``(SUCCEEDED | FAILED | CANCELED, reason)``.
    """
    word = (state or "").upper()
    if word in WORDS:
        return WORDS[word], f"the runner said {state}"
    failed = sorted(s for s, status in stages.items() if status in ("FAILED", "KILLED"))
    if failed:
        return FAILED, f"the runner said {state or 'nothing'}; stage {failed[0]} failed"
    unfinished = sorted(s for s, status in stages.items() if status == "RUNNING")
    if unfinished:
        return FAILED, f"the runner said {state}; stage {unfinished[0]} never finished"
    if skipped or any(stages.get(s) == "FINISHED" for s in LAST_STAGES):
        return SUCCEEDED, f"the runner said {state}; every stage finished"
    return FAILED, f"the runner said {state}; the run ended before its last stage"
