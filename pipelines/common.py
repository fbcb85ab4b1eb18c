"""Task groups both pipelines are built from: opening a run, preparing, quantizing, and
training plus evaluating one set of LoRA settings (a sweep runs that last group per trial)."""

from __future__ import annotations

from dataclasses import dataclass

from kfp import dsl
from qlora_kfp.components import (
    evaluate,
    fingerprint_sources,
    finish_tracking,
    preflight,
    prepare_dataset,
    quantize,
    start_tracking,
    train,
)
from qlora_kfp.pipelines import platform
from qlora_kfp.pipelines.params import inputs_for

RUN_ID = dsl.PIPELINE_JOB_ID_PLACEHOLDER


@dataclass
class OpenRun:
    """The opening tasks of a run, and the parameters every later task draws from: the
    pipeline's own plus where to report (``mlflow_parent_run_id``, ``kfp_run_id``)."""

    tracking: dsl.PipelineTask
    fingerprint: dsl.PipelineTask
    preflight: dsl.PipelineTask
    params: dict


def exit_task(p: dict) -> dsl.PipelineTask:
    """The exit handler's task. It may depend on no task, so it finds the parent MLflow run
    by its KFP run id tag."""
    finish = finish_tracking(mlflow_experiment=p["mlflow_experiment"], kfp_run_id=RUN_ID)
    return platform.small_task(finish, cache=False)


def open_run(p: dict, pipeline_name: str) -> OpenRun:
    """``start-tracking`` (fail-fast checks, parent run), ``fingerprint-sources`` and
    ``preflight`` (every stage's settings valid, training fits the GPU).

    Cached tasks take the fingerprint (content digests + code version) as an input, so new
    data under the same path or a rebuilt image never hits an old cache entry.
    """
    tracking = start_tracking(
        **inputs_for(start_tracking, p, kfp_run_id=RUN_ID, pipeline_name=pipeline_name)
    )
    platform.small_task(tracking, cache=False)
    fp = fingerprint_sources(**inputs_for(fingerprint_sources, p))
    platform.small_task(fp, cache=False)
    params = {**p, "mlflow_parent_run_id": tracking.output, "kfp_run_id": RUN_ID}
    check = preflight(**inputs_for(preflight, params))
    platform.small_task(check, cache=False)
    return OpenRun(tracking, fp, check, params)


def prepare(run: OpenRun) -> dsl.PipelineTask:
    task = prepare_dataset(
        **inputs_for(prepare_dataset, run.params, cache_fingerprint=run.fingerprint.output)
    )
    # It takes no input from start-tracking (that would be in its cache key) but reports under
    # the parent run start-tracking makes: run after it.
    task.after(run.tracking)
    return platform.cpu_task(task, cache=True)


def quantize_model(run: OpenRun, prep: dsl.PipelineTask) -> dsl.PipelineTask:
    task = quantize(
        **inputs_for(
            quantize,
            run.params,
            dataset=prep.outputs["dataset"],
            cache_fingerprint=run.fingerprint.output,
        )
    )
    task.after(run.preflight)  # no GPU task starts before the memory check has passed
    return platform.gpu_task(task, cache=True, params=run.params)


def train_and_evaluate(
    params: dict,
    quant: dsl.PipelineTask,
    prep: dsl.PipelineTask,
    overrides: dict | None = None,
) -> tuple[dsl.PipelineTask, dsl.PipelineTask]:
    """Train one adapter (``overrides`` replace train settings, e.g. a sweep trial's) and
    evaluate it against the base model."""
    given = {"config_overrides": overrides} if overrides is not None else {}
    tr = train(
        **inputs_for(
            train,
            params,
            quantized_model=quant.outputs["quantized_model"],
            dataset=prep.outputs["dataset"],
            **given,
        )
    )
    platform.gpu_task(tr, cache=False, params=params)
    ev = evaluate(
        **inputs_for(
            evaluate,
            params,
            quantized_model=quant.outputs["quantized_model"],
            adapter=tr.outputs["adapter"],
            dataset=prep.outputs["dataset"],
            **given,
        )
    )
    platform.gpu_task(ev, cache=False, params=params)
    return tr, ev
