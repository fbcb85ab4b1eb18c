"""What the bookkeeping components call: open and close tracking, decide, preflight, sweep.

These tasks wrap no training stage: they open the pipeline's parent MLflow run, decide whether
scheduled retraining has anything new to learn, check memory before any GPU is claimed, close
the run in the exit handler and pick a sweep's winner.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from qlora_kfp.errors import QloraError
from qlora_kfp.tasks.context import RunContext, fail, report, setup_logging
from qlora_kfp.tracking import runs

log = logging.getLogger("qlora_kfp")


def start_tracking(args: dict) -> str:
    """Fail fast on unreachable MLflow or a bad bucket, then open the parent run."""
    from qlora_kfp import preflight

    setup_logging()
    try:
        preflight.check_services()
        return runs.start_pipeline_run(
            args["mlflow_experiment"],
            args["run_name"],
            {
                "kfp.run_id": args["kfp_run_id"],
                "base_model": args["base_model"],
                "data_source": args["data_source"],
            },
        )
    except QloraError as exc:
        fail("start-tracking", exc)


def decide_training(args: dict) -> str:
    """``"train"`` or ``"skip"``: skip when the champion already saw this exact dataset."""
    from qlora_kfp.tracking import registry

    setup_logging()
    train, reason = registry.should_train(
        args["registered_model_name"], args["dataset_digest"], args["force_retrain"]
    )
    log.info("training decision: %s (%s)", "train" if train else "skip", reason)
    with runs.stage_run(args.get("mlflow_parent_run_id", ""), "decide-training") as run:
        run.tags(
            {"training_decision": "train" if train else "skip", "training_decision_reason": reason},
            parent=True,
        )
    return "train" if train else "skip"


def finish(args: dict) -> None:
    """Exit handler: close the parent run, write the report, post the webhook, clean up."""
    from qlora_kfp.tracking import outcome, report

    setup_logging()
    word, error = args["status"].state, args["status"].error_message or ""
    run_id = runs.find_pipeline_run(args["mlflow_experiment"], args["kfp_run_id"])
    metrics, tags, png, exp_id = {}, {}, None, ""
    if run_id:
        run = runs.client().get_run(run_id)  # read once: closing changes no metric
        metrics, tags, exp_id = run.data.metrics, run.data.tags, run.info.experiment_id
    stages = runs.stage_statuses(run_id)
    state, how = outcome.resolve(
        word,
        {stage: mlflow_status for stage, (mlflow_status, _) in stages.items()},
        skipped=tags.get("training_decision") == "skip",
    )
    log.info("run outcome: %s (%s)", state, how)
    if state != outcome.SUCCEEDED and not error:
        # The backend sends no error message: the failed stage's own reason, else what was found.
        error = next((why for _, why in stages.values() if why), how)
    if run_id:
        runs.close_pipeline_run(run_id, state, error, kfp_state=word)
        try:
            png = Path(
                runs.client().download_artifacts(run_id, "plots/loss_curve.png", "/tmp")
            ).read_bytes()
        except Exception:  # noqa: BLE001 - a failed run may have no plot
            png = None
    text = report.build(
        state,
        error,
        args["kfp_run_id"],
        metrics,
        tags,
        report.links(args["kfp_run_id"], exp_id, run_id),
        png,
    )
    Path(args["report"].path).write_text(text)
    url = os.environ.get(report.WEBHOOK_ENV, "")
    if url:
        report.post_webhook(url, report.summary(state, args["kfp_run_id"], metrics, error))
    checkpoints = RunContext(args["kfp_run_id"]).artifact_uri("train-checkpoints")
    if checkpoints and state == outcome.SUCCEEDED:  # resumable checkpoints are not needed any more
        from qlora_kfp.storage import s3

        s3.delete_prefix(checkpoints)


def pick_best(args: dict) -> dict:
    """Choose the sweep trial with the lowest eval loss; ``dsl.Collected`` keeps grid order."""
    setup_logging()
    grid, losses = list(args["lora_grid"]), [float(x) for x in args["eval_losses"]]
    if len(grid) != len(losses):
        raise SystemExit(f"pick-best-trial failed: {len(grid)} trials but {len(losses)} results")
    best = min(range(len(grid)), key=losses.__getitem__)
    with runs.stage_run(args.get("mlflow_parent_run_id", ""), "pick-best-trial") as run:
        report(run, args.get("metrics"), {"best_trial": best, "best_eval_loss": losses[best]})
        run.tags({"best_trial": json.dumps(grid[best], sort_keys=True)}, parent=True)
        for i, loss in enumerate(losses):
            run.metrics({"trial_eval_loss": loss}, step=i, parent=False)
    log.info("best trial %d of %d: %s (eval loss %.6g)", best, len(grid), grid[best], losses[best])
    return {**grid[best], "trial": best, "eval_loss": losses[best]}


def preflight(args: dict) -> str:
    """Validate every stage's config and check training fits the GPU, before any GPU task.

    Returns:
        The memory estimate's parts in GiB, as JSON.
    """
    from qlora_kfp import configs
    from qlora_kfp import preflight as checks

    setup_logging()
    try:
        built = {
            name: configs.from_params(cls, args) for name, cls in configs.STAGE_CONFIGS.items()
        }
        parts = checks.check_memory(
            args["base_model"],
            built["train"],
            built["prepare"].max_seq_length,
            args["gpu_memory_gib"],
        )
        with runs.stage_run(args.get("mlflow_parent_run_id", ""), "preflight") as run:
            run.metrics({"estimated_peak_gib": round(sum(parts.values()), 3)})
        return json.dumps(parts)
    except QloraError as exc:
        fail("preflight", exc)


def fingerprint(args: dict) -> str:
    """Content digests of the data and the base model, and the code version (cache input)."""
    from qlora_kfp.storage.fingerprint import fingerprint as digest

    return digest(args["data_source"], args["base_model"])
