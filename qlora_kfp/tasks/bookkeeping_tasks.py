"""What the bookkeeping components call: open and close tracking, decide, preflight, sweep.

These tasks wrap no training stage: they open the pipeline's parent MLflow run, decide whether
scheduled retraining has anything new to learn, check memory before any GPU is claimed, close
the run in the exit handler and pick a sweep's winner.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from qlora_kfp import env
from qlora_kfp.errors import ConfigError, QloraError
from qlora_kfp.fast_exit import ends_fast
from qlora_kfp.tasks.context import RunContext, fail, report, setup_logging
from qlora_kfp.tracking import parent_run, stage_runs

log = logging.getLogger("qlora_kfp")


def default_run_name(pipeline: str, data_source: str) -> str:
    """``<pipeline>-<dataset>-<yyyymmdd-hhmm>``: what the run did, on which data, when (a
    dataset's name is its file or folder name without data extensions, or a hub id's name)."""
    import time

    from qlora_kfp.configs import DATA_SUFFIXES, source_stem

    stem = source_stem(data_source, DATA_SUFFIXES)
    return f"{pipeline}-{stem or 'data'}-{time.strftime('%Y%m%d-%H%M')}"


@ends_fast
def start_tracking(args: dict) -> str:
    """Fail fast on unreachable MLflow or a bad bucket, then open the parent run."""
    from qlora_kfp import preflight

    setup_logging()
    try:
        preflight.check_services()
        return parent_run.start_pipeline_run(
            args["mlflow_experiment"],
            args["run_name"]
            or default_run_name(
                args.get("pipeline_name") or args["mlflow_experiment"], args["data_source"]
            ),
            {
                "kfp.run_id": RunContext.from_args(args).kfp_run_id,
                "base_model": args["base_model"],
                "data_source": args["data_source"],
            },
        )
    except QloraError as exc:
        fail("start-tracking", exc)


FORCE_HINT = "to train anyway: force_retrain=true (qlora-kfp run --force_retrain)"


def training_made_from(args: dict) -> dict:
    """What the model this run would train is made from: the prepared dataset's digest, the
    base model's content fingerprint, the code version (from ``fingerprint-sources``) and
    every result-changing setting (``configs.result_settings``, the definition checkpoints
    resume by). The register stage records it on the model version."""
    from qlora_kfp import configs

    sources = json.loads(args.get("cache_fingerprint") or "{}")
    return {
        "settings": configs.result_settings(args),
        "dataset_digest": args["dataset_digest"],
        "base_model": sources.get("model", args["base_model"]),
        "code": sources.get("code", ""),
    }


@ends_fast
def decide_training(args: dict) -> str:
    """``"train"`` or ``"skip"``: skip when the champion was made from exactly what this run
    would train on (dataset, base model, code and result-changing settings).

    A skip is one line in the task log (and ``make run``'s console) saying why and how to
    force training; the parent MLflow run is tagged with the champion it reuses.
    """
    from qlora_kfp import configs
    from qlora_kfp.tracking import registry

    setup_logging()
    try:
        made_from = training_made_from(args)
        # The name register-model adds the version to (given, or derived from the sources).
        name = configs.from_params(configs.RegisterConfig, args).registered_model_name
    except QloraError as exc:  # a bad setting: preflight says so too, in one line
        fail("decide-training", exc)
    decision = registry.should_train(name, made_from, args["force_retrain"])
    word = "train" if decision.train else "skip"
    if decision.train:
        log.info("training decision: train (%s)", decision.reason)
        log.info("training: %s", decision.reason)  # the console's line (app/progress.py)
    else:
        log.warning("training skipped: %s; %s", decision.reason, FORCE_HINT)
    tags = {
        "training_decision": word,
        "training_decision_reason": decision.reason,
        # Here, not only in prepare-dataset: a cached prepare-dataset does not run.
        "dataset.digest": args["dataset_digest"],
        registry.MADE_FROM_TAG: json.dumps(made_from, sort_keys=True),
    }
    if not decision.train:
        tags["qlora.reused_champion"] = decision.champion_run
        tags["qlora.reused_champion_version"] = decision.champion_version
        tags["mlflow.note.content"] = (
            f"No model trained: this run reuses champion {decision.champion_version} (run "
            f"{decision.champion_run}). {decision.reason[0].upper()}{decision.reason[1:]}. "
            f"{FORCE_HINT[0].upper()}{FORCE_HINT[1:]}."
        )
    with stage_runs.stage_run(args.get("mlflow_parent_run_id", ""), "decide-training") as run:
        run.tags(tags, parent=True)
    return word


@ends_fast
def finish_tracking(args: dict) -> None:
    """Exit handler: close the parent run, write the report, post the webhook, clean up."""
    from qlora_kfp.tracking import outcome, report

    setup_logging()
    kfp_run_id = RunContext.from_args(args).kfp_run_id
    word, error = args["status"].state, args["status"].error_message or ""
    run_id = parent_run.find_pipeline_run(args["mlflow_experiment"], kfp_run_id)
    metrics, tags, png, exp_id = {}, {}, None, ""
    if run_id:
        run = parent_run.client().get_run(run_id)  # read once: closing changes no metric
        metrics, tags, exp_id = run.data.metrics, run.data.tags, run.info.experiment_id
    stages = stage_runs.stage_statuses(run_id)
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
        parent_run.close_pipeline_run(run_id, state, error, kfp_state=word)
        try:
            png = Path(
                parent_run.client().download_artifacts(run_id, "plots/loss_curve.png", "/tmp")
            ).read_bytes()
        except Exception:  # noqa: BLE001 - a failed run may have no plot
            png = None
    link_map = report.links(kfp_run_id, exp_id, run_id)
    text = report.build(state, error, kfp_run_id, metrics, tags, link_map, png)
    Path(args["report"].path).write_text(text)
    if run_id:
        _describe(run_id, tags, report.build(state, error, kfp_run_id, metrics, tags, link_map))
        try:
            report.log_comparison(parent_run.client(), run_id, metrics)
        except Exception as exc:  # noqa: BLE001 - the run is closed; the report is written
            log.warning("base vs tuned not logged to MLflow: %s", exc)
    url = env.text(report.WEBHOOK_ENV)
    if url:
        report.post_webhook(url, report.summary(state, kfp_run_id, metrics, error, tags))
    checkpoints = RunContext(kfp_run_id).artifact_uri("train-checkpoints")
    if checkpoints and state == outcome.SUCCEEDED:  # resumable checkpoints are not needed any more
        from qlora_kfp.storage import s3

        s3.delete_prefix(checkpoints)


def _describe(run_id: str, tags: dict, text: str) -> None:
    """The run report as the parent run's description (after a reuse note, if any)."""
    from qlora_kfp.tracking import report

    note = tags.get(report.DESCRIPTION_TAG, "")
    body = text if not note or note in text else f"{note}\n\n{text}"
    try:
        parent_run.client().set_tag(run_id, report.DESCRIPTION_TAG, body[:5000])
    except Exception as exc:  # noqa: BLE001 - a description is a convenience
        log.warning("run description not set: %s", exc)


@ends_fast
def pick_best_trial(args: dict) -> dict:
    """Choose the sweep trial with the lowest eval loss; ``dsl.Collected`` keeps grid order.

    The parent MLflow run shows the grid and the winner: every trial's name, settings and eval
    loss as a table and a bar chart, the winner as tags.
    """
    from qlora_kfp.tasks.context import trial_label

    setup_logging()
    grid, losses = list(args["lora_grid"]), [float(x) for x in args["eval_losses"]]
    if len(grid) != len(losses):
        raise SystemExit(f"pick-best-trial failed: {len(grid)} trials but {len(losses)} results")
    best = min(range(len(grid)), key=losses.__getitem__)
    names = [trial_label(entry) for entry in grid]
    rows = [
        {"trial": name, **entry, "eval_loss": loss}
        for name, entry, loss in zip(names, grid, losses, strict=True)
    ]
    with stage_runs.stage_run(args.get("mlflow_parent_run_id", ""), "pick-best-trial") as run:
        report(run, args.get("metrics"), {"best_trial": best, "best_eval_loss": losses[best]})
        run.tags(
            {
                "best_trial": json.dumps(grid[best], sort_keys=True),
                "best_trial.name": names[best],
                "sweep.grid": json.dumps(grid, sort_keys=True)[:5000],
            },
            parent=True,
        )
        for i, loss in enumerate(losses):
            run.metrics({"trial_eval_loss": loss}, step=i, parent=False)
        _show_trials(run, names, losses, best, rows)
    _drop_trial_checkpoints(RunContext.from_args(args).kfp_run_id, grid)
    log.info("best trial %d of %d: %s (eval loss %.6g)", best, len(grid), grid[best], losses[best])
    return {**grid[best], "trial": best, "trial_name": names[best], "eval_loss": losses[best]}


def _show_trials(run, names: list[str], losses: list[float], best: int, rows: list[dict]):
    """The trials table and bar chart on the parent; best effort, since every trial already
    trained and the winner is known, a hiccup here must not fail the sweep."""
    if not run.run_id:
        return
    try:
        import pandas as pd

        from qlora_kfp.tracking import plots

        parent_run.client().log_table(run.parent_run_id, pd.DataFrame(rows), "sweep/trials.json")
        png = plots.trial_bars(names, losses, best, "/tmp/sweep_trials.png")
        run.artifact(str(png), "plots", parent=True)
    except Exception as exc:  # noqa: BLE001
        log.warning("could not log the sweep's trials table and chart: %s", exc)


def _drop_trial_checkpoints(kfp_run_id: str, grid: list[dict]) -> None:
    """Every trial finished: their resumable checkpoints are not needed any more (best
    effort: what is left costs storage, not a failed sweep)."""
    from qlora_kfp.tasks.context import trial_label

    for entry in grid:
        uri = RunContext(kfp_run_id, trial=trial_label(entry)).artifact_uri("train-checkpoints")
        if uri:
            from qlora_kfp.storage import s3

            try:
                s3.delete_prefix(uri)
            except Exception as exc:  # noqa: BLE001
                log.warning("could not delete %s: %s", uri, exc)


@ends_fast
def preflight(args: dict) -> str:
    """Validate every stage's config and check training fits the GPU, before any GPU task.

    In a sweep every trial is checked (its grid entry over the pipeline's train settings), so
    a bad or too large trial fails here, not after the dataset is prepared and quantized.

    Returns:
        The memory estimate's parts in GiB (of the largest trial), as JSON.
    """
    from qlora_kfp import configs
    from qlora_kfp import preflight as checks
    from qlora_kfp.tasks.context import trial_label

    setup_logging()
    try:
        built = {
            name: configs.from_params(cls, args) for name, cls in configs.STAGE_CONFIGS.items()
        }
        configs.from_params(configs.PipelineConfig, args)  # the GPU pool settings too
        trials, seen = list(args.get("lora_grid") or []), {}
        for i, entry in enumerate(trials):
            configs.check_known(entry, configs.TrainConfig.__dataclass_fields__, f"lora_grid[{i}]")
            twin = seen.setdefault(trial_label(entry), i)
            if twin != i:
                raise ConfigError(
                    f"lora_grid[{i}] repeats lora_grid[{twin}]: each trial must differ"
                )
        estimates = []
        for entry in trials or [{}]:
            train = configs.from_params(configs.TrainConfig, {**args, **entry})
            # A TrainJob's nodes work through S3: refused here, before any GPU is claimed.
            train.check_runner(env.text(checks.ARTIFACT_URI_ENV))
            estimates.append(
                checks.check_memory(
                    args["base_model"],
                    train,
                    built["prepare"].max_seq_length,
                    train.gpu_memory_gib,  # a trial may set its own
                    built["quantize"].quant_storage,
                )
            )
        parts = max(estimates, key=lambda p: sum(p.values()))
        with stage_runs.stage_run(args.get("mlflow_parent_run_id", ""), "preflight") as run:
            run.metrics({"estimated_peak_gib": round(sum(parts.values()), 3)})
        return json.dumps(parts)
    except QloraError as exc:
        fail("preflight", exc)


@ends_fast
def fingerprint_sources(args: dict) -> str:
    """Content digests of the data and the base model, and the code version (cache input)."""
    from qlora_kfp.storage.fingerprint import fingerprint as digest

    setup_logging()
    try:
        return digest(args["data_source"], args["base_model"])
    except QloraError as exc:  # e.g. damaged weights, S3 refusing the credentials
        fail("fingerprint-sources", exc)
