"""What the KFP components call: config from parameters, the stage, then reporting.

Each component body is one line, ``return entrypoints.<stage>(locals())``; this module turns
those locals into the stage's typed config, opens the stage's nested MLflow run, calls the
library function, and reports: KFP ``Metrics``/``HTML`` artifacts, MLflow params, metrics and
artifacts, and an S3 copy of the artifact when ``QLORA_KFP_ARTIFACT_URI`` is set. A
:class:`QloraError` ends the task with its one-line message instead of a library traceback.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qlora_kfp import configs, tracking
from qlora_kfp.errors import QloraError

log = logging.getLogger("qlora_kfp")
COMMON_PARAMS = ("mlflow_parent_run_id", "kfp_run_id")
ARTIFACT_URI_ENV = "QLORA_KFP_ARTIFACT_URI"


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")


@contextlib.contextmanager
def stage(name: str, cls: type, args: dict) -> Iterator[tuple[Any, tracking.StageRun]]:
    """Build the config, open the nested MLflow run, and turn user errors into a clean exit."""
    setup_logging()
    t0 = time.perf_counter()
    try:
        cfg = configs.from_params(cls, args)
        with tracking.stage_run(
            args.get("mlflow_parent_run_id", ""), name, args.get("kfp_run_id", "")
        ) as run:
            run.params(dataclasses.asdict(cfg))
            yield cfg, run
            usage = resource_usage(time.perf_counter() - t0)
            log.info("%s used %s", name, json.dumps(usage))
            # On the parent run, one name per stage, so runs compare stage by stage.
            report(run, args.get("metrics"), usage, parent_prefix=f"{name}.")
    except QloraError as exc:
        log.error("%s failed: %s", name, exc)
        sys.exit(f"{name} failed: {exc}")


def resource_usage(seconds: float) -> dict[str, float]:
    """The stage's wall time and peak memory: this process's RSS and, when it used CUDA, the
    GPU's (each KFP task is its own process, so the peaks are the stage's own)."""
    import resource

    usage = {
        "stage_seconds": round(seconds, 2),
        # ru_maxrss is in KiB on Linux.
        "stage_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
    }
    torch = sys.modules.get("torch")  # a stage that never imported torch used no GPU
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        usage["stage_gpu_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        usage["stage_gpu_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
    return usage


def report(
    run: tracking.StageRun, kfp_metrics: Any, metrics: dict, parent_prefix: str = ""
) -> None:
    """Log numeric metrics to the KFP Metrics artifact and to MLflow (stage and parent run,
    there under ``parent_prefix`` + name)."""
    for k, v in metrics.items():
        if isinstance(v, int | float) and not isinstance(v, bool) and kfp_metrics is not None:
            kfp_metrics.log_metric(k, float(v))
    run.metrics(metrics, parent_prefix=parent_prefix)


def publish(folder: str, stage_name: str, args: dict) -> str:
    """Copy an artifact folder to ``$QLORA_KFP_ARTIFACT_URI/<kfp_run_id>/<stage>/``."""
    base = os.environ.get(ARTIFACT_URI_ENV, "")
    if not base:
        return ""
    from qlora_kfp import s3

    uri = f"{base.rstrip('/')}/{args.get('kfp_run_id') or 'local'}/{stage_name}"
    s3.upload_folder(folder, uri)
    log.info("published %s to %s", folder, uri)
    return uri


def html_with_image(png: str | Path, title: str) -> str:
    data = base64.b64encode(Path(png).read_bytes()).decode()
    return f"<html><body><h3>{title}</h3><img src='data:image/png;base64,{data}'/></body></html>"


def _mark(artifact: Any, **meta: Any) -> None:
    if artifact is not None and hasattr(artifact, "metadata"):
        artifact.metadata.update({k: v for k, v in meta.items() if v not in (None, "")})


def prepare_dataset(args: dict) -> str:
    """Run prepare-dataset; returns the dataset digest (used for caching and skip logic)."""
    from qlora_kfp.data.prepare import run_prepare

    with stage("prepare-dataset", configs.PrepareConfig, args) as (cfg, run):
        res = run_prepare(cfg, args["dataset"].path)
        report(run, args.get("metrics"), res.stats)
        run.artifact(str(Path(res.path) / "stats.json"), "dataset")
        run.artifact(str(Path(res.path) / "rendered_samples.txt"), "dataset")
        _log_dataset_input(run, res.path, res.digest, cfg.data_source)
        run.tags({"dataset.digest": res.digest}, parent=True)
        _mark(
            args["dataset"],
            digest=res.digest,
            cache_fingerprint=args.get("cache_fingerprint"),
            s3_uri=publish(res.path, "dataset", args),
        )
        return res.digest


def _log_dataset_input(run: tracking.StageRun, folder: str, digest: str, source: str) -> None:
    if not run.run_id:
        return
    import mlflow
    import pandas as pd

    df = pd.read_parquet(Path(folder) / "train.parquet", columns=["prompt", "reference"])
    ds = mlflow.data.from_pandas(df, source=source, name="train", digest=digest)
    with mlflow.start_run(run_id=run.run_id):
        mlflow.log_input(ds, context="training")
    with mlflow.start_run(run_id=run.parent_run_id):
        mlflow.log_input(ds, context="training")


def quantize(args: dict) -> None:
    from qlora_kfp.quantize import run_quantize

    with stage("quantize", configs.QuantizeConfig, args) as (cfg, run):
        dataset = args.get("dataset")
        res = run_quantize(cfg, args["quantized_model"].path, dataset.path if dataset else None)
        report(run, args.get("metrics"), res.metrics)
        _mark(
            args["quantized_model"],
            quant_type=cfg.quant_type,
            s3_uri=publish(res.path, "quantized-model", args),
        )


def train(args: dict) -> float:
    """Run train; returns the final eval loss."""
    from qlora_kfp.train import run_train

    with stage("train", configs.TrainConfig, args) as (cfg, run):
        base = os.environ.get(ARTIFACT_URI_ENV, "")
        mirror = f"{base.rstrip('/')}/{args.get('kfp_run_id') or 'local'}/train-checkpoints"
        res = run_train(
            cfg,
            args["quantized_model"].path,
            args["dataset"].path,
            args["adapter"].path,
            checkpoint_uri=mirror if base else "",
        )
        run.history(
            res.history,
            ("loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_s", "gpu_mem_gib"),
        )
        report(
            run,
            args.get("metrics"),
            {f"final_{k}" if k in ("eval_loss",) else k: v for k, v in res.metrics.items()},
        )
        run.artifacts(res.path, "adapter")
        png = Path(res.path) / "loss_curve.png"
        run.artifact(str(png), "plots", parent=True)
        if args.get("loss_curve") is not None:
            Path(args["loss_curve"].path).write_text(html_with_image(png, "Training loss"))
        _mark(args["adapter"], s3_uri=publish(res.path, "adapter", args))
        return float(res.metrics["eval_loss"])


def evaluate(args: dict) -> float:
    """Run evaluate; returns the tuned model's eval loss."""
    from qlora_kfp.evaluate import run_evaluate

    with stage("evaluate", configs.EvaluateConfig, args) as (cfg, run):
        out = args["evaluation"].path
        res = run_evaluate(
            cfg, args["quantized_model"].path, args["adapter"].path, args["dataset"].path, out
        )
        report(run, args.get("metrics"), res.metrics)
        run.artifacts(res.path, "evaluation")
        run.artifact(str(Path(res.path) / "comparison.png"), "plots", parent=True)
        run.table(res.samples, "sample_generations.json")
        if args.get("report") is not None:
            Path(args["report"].path).write_text((Path(res.path) / "report.html").read_text())
        _mark(args["evaluation"], s3_uri=publish(res.path, "evaluation", args))
        return float(res.metrics["tuned_eval_loss"])


def merge(args: dict) -> None:
    from qlora_kfp.merge import run_merge

    with stage("merge", configs.MergeConfig, args) as (cfg, run):
        res = run_merge(cfg, args["adapter"].path, args["merged_model"].path)
        report(run, args.get("metrics"), res.metrics)
        _mark(args["merged_model"], s3_uri=publish(res.path, "merged-model", args))


def register(args: dict) -> str:
    """Register the merged model as a new version (alias challenger, champion if better)."""
    from qlora_kfp import registry

    with stage("register", configs.RegisterConfig, args) as (cfg, run):
        if not (cfg.registered_model_name and run.run_id):
            log.warning("registration skipped (no registered_model_name or tracking is off)")
            return ""
        model = args["merged_model"]
        source = (model.metadata or {}).get("s3_uri", "")
        if not source:  # no artifact store configured: the registry keeps its own copy
            run.artifacts(model.path, "merged_model")
            source = f"{tracking.client().get_run(run.run_id).info.artifact_uri}/merged_model"
        tags = {
            "base_model": cfg.base_model,
            "dataset_digest": args["dataset_digest"],
            "kfp.run_id": args.get("kfp_run_id", ""),
            "mlflow.parent_run": run.parent_run_id,
        }
        res = registry.register(
            cfg.registered_model_name, source, run.run_id, tags, float(args["tuned_eval_loss"])
        )
        report(
            run,
            args.get("metrics"),
            {"registered_version": int(res.version), "promoted_to_champion": int(res.promoted)},
        )
        run.tags(
            {
                "registered_model": f"{cfg.registered_model_name}/{res.version}",
                "promotion": res.reason,
            },
            parent=True,
        )
        return res.version


def start_tracking(args: dict) -> str:
    """Fail fast on unreachable MLflow or a bad bucket, then open the parent run."""
    from qlora_kfp import preflight

    setup_logging()
    try:
        preflight.check_services()
        return tracking.start_pipeline_run(
            args["mlflow_experiment"],
            args["run_name"],
            {
                "kfp.run_id": args["kfp_run_id"],
                "base_model": args["base_model"],
                "data_source": args["data_source"],
            },
        )
    except QloraError as exc:
        log.error("start-tracking failed: %s", exc)
        sys.exit(f"start-tracking failed: {exc}")


def decide_training(args: dict) -> str:
    """``"train"`` or ``"skip"``: skip when the champion already saw this exact dataset."""
    from qlora_kfp import registry

    setup_logging()
    train, reason = registry.should_train(
        args["registered_model_name"], args["dataset_digest"], args["force_retrain"]
    )
    log.info("training decision: %s (%s)", "train" if train else "skip", reason)
    with tracking.stage_run(args.get("mlflow_parent_run_id", ""), "decide-training") as run:
        run.tags(
            {"training_decision": "train" if train else "skip", "training_decision_reason": reason},
            parent=True,
        )
    return "train" if train else "skip"


def preflight(args: dict) -> str:
    """Fail before any GPU is claimed when training cannot fit the GPU; returns the estimate."""
    import json

    from transformers import AutoConfig

    from qlora_kfp import attention, memory, sources
    from qlora_kfp.errors import ConfigError

    setup_logging()
    try:
        cfg = AutoConfig.from_pretrained(sources.model_source(args["base_model"]))
        kw = dict(
            gradient_checkpointing=args["gradient_checkpointing"],
            gradient_checkpointing_layers=args["gradient_checkpointing_layers"],
            fused_loss=args["fused_kernels"] != "off",
            packing=args["packing"],
            fp32_upcast=args["fp32_upcast"],
            # Training runs on the GPU image, whose torch has the varlen kernel.
            attention=attention.resolve(args["attn_implementation"], args["packing"], True),
        )
        # A bin holds pack_length tokens; other modes hold rows of at most max_seq_length.
        seq = args["max_seq_length"]
        if args["packing"] == "bins" and args["pack_length"]:
            seq = args["pack_length"]
        est = memory.estimate(cfg, seq, args["batch_size"], args["lora_r"], **kw)
        log.info(
            "estimated peak GPU memory for batch %d x %d tokens:\n%s",
            args["batch_size"],
            seq,
            est.table(),
        )
        budget = 0.95 * args["gpu_memory_gib"]
        fewest = None
        if args["gradient_checkpointing"]:
            fewest = memory.fewest_checkpointed_layers(
                cfg, seq, args["batch_size"], args["lora_r"], budget, **kw
            )
        layers = args["gradient_checkpointing_layers"]
        if est.total_gib > budget:
            fits = memory.largest_batch(cfg, seq, args["lora_r"], budget, **kw)
            if fewest is not None:  # only fewer layers keeping their activations fit
                hint = f"use gradient_checkpointing_layers={fewest} (or -1: every layer)"
            elif fits:
                hint = (
                    f"use batch_size={fits} with gradient_accumulation_steps="
                    f"{-(-args['batch_size'] // fits)}"
                )
            else:
                hint = "lower max_seq_length or use a GPU with more memory"
            raise ConfigError(
                f"training needs about {est.total_gib} GiB but the GPU has "
                f"{args['gpu_memory_gib']} GiB; {hint}\n{est.table()}"
            )
        if fewest is not None and (layers < 0 or fewest < min(layers, cfg.num_hidden_layers)):
            log.info(
                "this GPU also fits gradient_checkpointing_layers=%d (now %d): fewer layers "
                "recompute their activations, which trains faster (BENCHMARKS.md)",
                fewest,
                layers,
            )
        with tracking.stage_run(args.get("mlflow_parent_run_id", ""), "preflight") as run:
            run.metrics({"estimated_peak_gib": est.total_gib})
        return json.dumps(est.parts_gib)
    except QloraError as exc:
        log.error("preflight failed: %s", exc)
        sys.exit(f"preflight failed: {exc}")


def finish(args: dict) -> None:
    """Exit handler: close the parent run, write the report, post the webhook, clean up."""
    from qlora_kfp import report

    setup_logging()
    status = args["status"]
    state, error = status.state, status.error_message or ""
    run_id = tracking.finish_pipeline_run(
        args["mlflow_experiment"], args["kfp_run_id"], state, error
    )
    metrics, tags, png, exp_id = {}, {}, None, ""
    if run_id:
        run = tracking.client().get_run(run_id)
        metrics, tags, exp_id = run.data.metrics, run.data.tags, run.info.experiment_id
        try:
            png = Path(
                tracking.client().download_artifacts(run_id, "plots/loss_curve.png", "/tmp")
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
    base = os.environ.get(ARTIFACT_URI_ENV, "")
    if base and state == "SUCCEEDED":  # resumable checkpoints are not needed any more
        from qlora_kfp import s3

        s3.delete_prefix(f"{base.rstrip('/')}/{args['kfp_run_id']}/train-checkpoints")


def pick_best(args: dict) -> dict:
    """Choose the sweep trial with the lowest eval loss; ``dsl.Collected`` keeps grid order."""
    setup_logging()
    grid, losses = list(args["lora_grid"]), [float(x) for x in args["eval_losses"]]
    if len(grid) != len(losses):
        sys.exit(f"pick-best-trial failed: {len(grid)} trials but {len(losses)} results")
    best = min(range(len(grid)), key=losses.__getitem__)
    with tracking.stage_run(args.get("mlflow_parent_run_id", ""), "pick-best-trial") as run:
        report(run, args.get("metrics"), {"best_trial": best, "best_eval_loss": losses[best]})
        run.tags({"best_trial": json.dumps(grid[best], sort_keys=True)}, parent=True)
        for i, loss in enumerate(losses):
            run.metrics({"trial_eval_loss": loss}, step=i, parent=False)
    log.info("best trial %d of %d: %s (eval loss %.6g)", best, len(grid), grid[best], losses[best])
    return {**grid[best], "trial": best, "eval_loss": losses[best]}
