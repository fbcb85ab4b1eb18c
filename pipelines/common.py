"""Task groups both pipelines open with: the exit handler, tracking, the cache fingerprint."""

from kfp import dsl
from qlora_kfp.components import fingerprint_sources, finish_tracking, start_tracking
from qlora_kfp.pipelines import platform


def exit_task(mlflow_experiment: str, run_id: str) -> dsl.PipelineTask:
    """The exit handler's task. It may depend on no task, so it finds the parent MLflow run
    by its KFP run id tag."""
    finish = finish_tracking(mlflow_experiment=mlflow_experiment, kfp_run_id=run_id)
    return platform.small_task(finish, cache=False)


def open_run(
    mlflow_experiment: str, run_name: str, run_id: str, base_model: str, data_source: str
) -> tuple[dsl.PipelineTask, dsl.PipelineTask]:
    """``start-tracking`` (fail-fast checks, parent run) and ``fingerprint-sources``.

    Cached tasks take the fingerprint (content digests + code version) as an input, so new
    data under the same path or a rebuilt image never hits an old cache entry.
    """
    tracking = start_tracking(
        mlflow_experiment=mlflow_experiment,
        run_name=run_name,
        kfp_run_id=run_id,
        base_model=base_model,
        data_source=data_source,
    )
    platform.small_task(tracking, cache=False)
    fp = fingerprint_sources(data_source=data_source, base_model=base_model)
    platform.small_task(fp, cache=False)
    return tracking, fp
