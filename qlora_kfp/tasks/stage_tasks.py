"""What the stage components call: artifacts in, the library stage, artifacts out.

Each stage component's body is one line, ``return stage_tasks.<stage>(locals())``. This module
turns those locals into the stage's typed config (:func:`context.stage`), calls the plain
library function, and reports: KFP ``Metrics``/``HTML`` artifacts, MLflow params, metrics and
artifacts, and an S3 copy of the artifact when ``QLORA_KFP_ARTIFACT_URI`` is set.
"""

from __future__ import annotations

import logging
from pathlib import Path

from qlora_kfp import configs
from qlora_kfp.fast_exit import ends_fast
from qlora_kfp.tasks.context import html_with_image, mark, report, stage
from qlora_kfp.tracking import cached, live, parent_run, stage_runs

log = logging.getLogger("qlora_kfp")


@ends_fast
def prepare_dataset(args: dict) -> str:
    """Run prepare-dataset; returns the dataset digest (used for caching and skip logic)."""
    from qlora_kfp.stages.prepare import run_prepare

    with stage("prepare-dataset", configs.PrepareConfig, args) as (cfg, run, ctx):
        res = run_prepare(cfg, args["dataset"].path)
        report(run, args.get("metrics"), res.stats)
        run.artifact(str(Path(res.path) / "stats.json"), "dataset")
        run.artifact(str(Path(res.path) / "rendered_samples.txt"), "dataset")
        _log_dataset_input(run, res.path, res.digest, cfg.data_source)
        run.tags({"dataset.digest": res.digest}, parent=True)
        mark(
            args["dataset"],
            digest=res.digest,
            cache_fingerprint=args.get("cache_fingerprint"),
            s3_uri=ctx.publish(res.path, "dataset"),
            **{cached.SOURCE_KEY: run.run_id},  # a run that reuses it from KFP's cache reads it
        )
        return res.digest


def _log_dataset_input(run: stage_runs.StageRun, folder: str, digest: str, source: str) -> None:
    if not run.run_id:
        return
    import mlflow
    import pandas as pd
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    df = pd.read_parquet(Path(folder) / "train.parquet", columns=["prompt", "reference"])
    ds = mlflow.data.from_pandas(df, source=source, name="train", digest=digest)
    entry = DatasetInput(ds._to_mlflow_entity(), [InputTag(MLFLOW_DATASET_CONTEXT, "training")])
    # Through the client: ``with mlflow.start_run(run_id=...)`` would end the run it resumes,
    # and the parent would read FINISHED while the pipeline is still training.
    for run_id in (run.run_id, run.parent_run_id):
        parent_run.client().log_inputs(run_id, datasets=[entry])


@ends_fast
def quantize(args: dict) -> None:
    from qlora_kfp.stages.quantize import run_quantize

    with stage("quantize", configs.QuantizeConfig, args) as (cfg, run, ctx):
        dataset = args.get("dataset")
        res = run_quantize(cfg, args["quantized_model"].path, dataset.path if dataset else None)
        report(run, args.get("metrics"), res.metrics)
        mark(
            args["quantized_model"],
            quant_type=cfg.quant_type,
            s3_uri=ctx.publish(res.path, "quantized-model"),
            **{cached.SOURCE_KEY: run.run_id},
        )


@ends_fast
def train(args: dict) -> float:
    """Run train; returns the final eval loss."""
    from qlora_kfp.stages.train import run_train

    with stage("train", configs.TrainConfig, args) as (cfg, run, ctx):
        if run.to_parent:  # the pipeline's own run (a sweep trial's stages log apart)
            cached.carry_over(run.parent_run_id, "prepare-dataset", args["dataset"])
            cached.carry_over(run.parent_run_id, "quantize", args["quantized_model"])
        with live.system_metrics(run.run_id), live.progress_label(ctx.trial):
            res = run_train(
                cfg,
                args["quantized_model"].path,
                args["dataset"].path,
                args["adapter"].path,
                checkpoint_uri=ctx.artifact_uri("train-checkpoints"),
                on_log=live.metric_streamer(run),  # MLflow shows each step as it happens
                # train_runner=trainjob: the TrainJob's files, and the inputs' S3 copies.
                job_uri=ctx.artifact_uri("train-job"),
                input_uris={
                    name: args[name].metadata.get("s3_uri", "")
                    for name in ("quantized_model", "dataset")
                },
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
        mark(args["adapter"], s3_uri=ctx.publish(res.path, "adapter"))
        return float(res.metrics["eval_loss"])


@ends_fast
def evaluate(args: dict) -> float:
    """Run evaluate; returns the tuned model's eval loss."""
    from qlora_kfp.stages.evaluate import run_evaluate

    with stage("evaluate", configs.EvaluateConfig, args) as (cfg, run, ctx):
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
        mark(args["evaluation"], s3_uri=ctx.publish(res.path, "evaluation"))
        return float(res.metrics["tuned_eval_loss"])


@ends_fast
def merge(args: dict) -> str:
    """Run merge; returns where the merged model can be read (``register-model`` takes this
    URI, not the artifact: the KFP launcher downloads every input artifact in full)."""
    from qlora_kfp.stages.merge import run_merge

    with stage("merge", configs.MergeConfig, args) as (cfg, run, ctx):
        res = run_merge(cfg, args["adapter"].path, args["merged_model"].path)
        report(run, args.get("metrics"), res.metrics)
        published = ctx.publish(res.path, "merged-model")
        mark(args["merged_model"], s3_uri=published)
        return published or _readable_uri(args["merged_model"])


def _readable_uri(artifact) -> str:
    """The artifact's own URI for a reader outside KFP: the local folder under ``kfp.local``;
    on a backend the object store's (KFP writes ``minio://bucket/key`` for its S3-compatible
    store, which boto3 and MLflow read as ``s3://bucket/key``)."""
    uri = getattr(artifact, "uri", "") or artifact.path
    if uri.startswith("minio://"):
        return "s3://" + uri[len("minio://") :]
    return uri if "://" in uri else artifact.path


@ends_fast
def register_model(args: dict) -> str:
    """Register the merged model as a new version (alias challenger, champion if better)."""
    from qlora_kfp.tracking import registry

    with stage("register", configs.RegisterConfig, args) as (cfg, run, ctx):
        if not run.run_id:
            log.warning("registration skipped (tracking is off)")
            return ""
        source = args["merged_model_uri"]
        if Path(source).is_dir():  # a local run: the registry keeps its own copy
            run.artifacts(source, "merged_model")
            source = f"{parent_run.client().get_run(run.run_id).info.artifact_uri}/merged_model"
        elif not ctx.artifact_uri(""):
            log.warning(
                "registering %s, KFP's own copy of the merged model (QLORA_KFP_ARTIFACT_URI "
                "is not set): whoever loads the version needs that store's endpoint and "
                "credentials, and KFP may delete old artifacts; set QLORA_KFP_ARTIFACT_URI to "
                "publish a copy of your own",
                source,
            )
        tags = {
            "base_model": cfg.base_model,
            "data_source": cfg.data_source,
            "dataset_digest": args["dataset_digest"],
            "kfp.run_id": ctx.kfp_run_id,
            "mlflow.parent_run": run.parent_run_id,
        }
        # What the model was made from (decide-training put it on the parent): the next
        # run's retraining gate compares against it.
        parent = parent_run.client().get_run(run.parent_run_id) if run.parent_run_id else None
        if made_from := parent and parent.data.tags.get(registry.MADE_FROM_TAG):
            tags[registry.MADE_FROM_TAG] = made_from
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
                "promotion": res.summary,
            },
            parent=True,
        )
        return res.version
