"""Stage 3, train: QLoRA (LoRA adapters on the frozen 4-bit model) with transformers' Trainer.

One process per GPU of the pod (``num_processes``): with one, training runs in this process;
with several, this process decides how they share the work (``parallelism``: DDP or FSDP,
:mod:`qlora_kfp.training.parallelism`), launches them (:mod:`qlora_kfp.training.distributed`)
and waits. With ``train_runner=trainjob`` the processes run on ``num_nodes`` pods of a Kubeflow
Trainer TrainJob that this process creates and watches (:mod:`qlora_kfp.stages.train_job`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from qlora_kfp.configs import JOB_RUNNERS, TrainConfig
from qlora_kfp.errors import ArtifactError, ConfigError
from qlora_kfp.stages.train_loop import TrainResult, train_here
from qlora_kfp.storage import artifacts
from qlora_kfp.storage.fingerprint import artifact_digest
from qlora_kfp.storage.manifest import check_output, verify
from qlora_kfp.storage.writes import output_lock
from qlora_kfp.training import (
    attention,
    autofit,
    distributed,
    fsdp,
    memory_fit,
    modeling,
    parallelism,
    resume,
)

__all__ = ["TrainResult", "run_train", "train_here"]
log = logging.getLogger(__name__)


def _made_from(cfg: TrainConfig, model_dir: str, dataset_dir: str) -> dict:
    """What this run's checkpoints and adapter are made from (resume.made_from)."""
    return resume.made_from(cfg, artifacts.dataset_digest(dataset_dir), artifact_digest(model_dir))


def _check_tokenizer(model_dir: str, dataset_dir: str) -> None:
    """Refuse a dataset tokenized for another model than the quantized one (its token ids
    would mean other text: training would run, and learn nothing of the data)."""
    from transformers import AutoTokenizer

    try:
        what = f"{model_dir} (quantized from {artifacts.base_model_of(model_dir)['base_model']})"
    except ArtifactError:  # a 4-bit model written by hand: the base is not recorded
        what = str(model_dir)
    artifacts.check_tokenizer(
        dataset_dir,
        AutoTokenizer.from_pretrained(model_dir),
        what,
        "prepare the dataset with the base model that was quantized, or train on its model",
    )


def decide_parallelism(cfg: TrainConfig, model_dir: str, dataset_dir: str) -> TrainConfig:
    """``cfg`` with ``parallelism`` decided (``parallelism.decide``, on ``gpu_memory_gib``, as
    the preflight decides), and checked against the model's 4-bit storage under FSDP.

    Raises:
        ConfigError: FSDP on a model it cannot shard (uint8 storage) or would corrupt.
    """
    from transformers import AutoConfig

    rows = artifacts.token_rows(dataset_dir, "train")
    plan = parallelism.decide(
        AutoConfig.from_pretrained(model_dir),
        cfg,
        memory_fit.plan_length(cfg, rows),
        cfg.gpu_memory_gib,
        autofit.host_available_gib() / cfg.num_processes,
        has_varlen=attention.kernel() is not None,
    )
    log.info("%d processes, %s", cfg.num_processes, plan.summary())
    if plan.mode == "fsdp":
        fsdp.check_storage(
            fsdp.storage_of(model_dir),
            cfg.compute_dtype,
            modeling.device() == "cuda",
            model_dir,
            plan.describe(),
        )
    return plan.resolve(cfg)


def run_train(
    cfg: TrainConfig,
    model_dir: str,
    dataset_dir: str,
    output_dir: str,
    checkpoint_dir: str = "",
    checkpoint_uri: str = "",
    on_log: Callable[[dict], None] | None = None,
    job_uri: str = "",
    input_uris: dict[str, str] | None = None,
) -> TrainResult:
    """Train a LoRA adapter on the 4-bit model in ``model_dir`` and save it to ``output_dir``.

    Args:
        cfg: The stage configuration.
        model_dir: A quantized-model artifact (from :func:`qlora_kfp.stages.quantize.run_quantize`).
        dataset_dir: A prepared dataset artifact.
        output_dir: Folder to create: ``adapter_model.safetensors``, ``adapter_config.json``,
            the tokenizer, ``history.json`` and ``loss_curve.png``.
        checkpoint_dir: Where resumable checkpoints go (default: ``<output_dir>.checkpoints``);
            a rerun resumes from the newest complete one.
        checkpoint_uri: Optional ``s3://`` mirror of the checkpoints, for a restart on
            another machine (a KFP retry after preemption).
        on_log: Called with each logged row (``step``, ``loss``, ``learning_rate``, ...) as
            training logs it, e.g. to stream it to a tracking server.
        job_uri: ``train_runner=trainjob``: the ``s3://`` folder of the TrainJob's job, inputs
            and outputs (the tasks give ``<QLORA_KFP_ARTIFACT_URI>/<run>/train-job``).
        input_uris: ``train_runner=trainjob``: published S3 copies of the inputs
            (``quantized_model``, ``dataset``), which the nodes read where they hold the
            same files; otherwise the task uploads the inputs under ``job_uri``.

    Returns:
        The folder, final metrics and the per-step history.
    """
    cfg.check_runner(job_uri)
    # Refuse an output that is not ours before any long work (atomic_folder checks again).
    check_output(output_dir, "adapter", (model_dir, dataset_dir))
    if distributed.launched():
        raise ConfigError(
            "run the train stage as one process: it starts one process per GPU itself "
            "(num_processes); under torchrun every rank would look for checkpoints at once"
        )
    # One run at a time writes an adapter and its checkpoints: a second is refused here.
    with output_lock(output_dir):
        return _train(
            cfg,
            dict(model_dir=model_dir, dataset_dir=dataset_dir, output_dir=output_dir),
            checkpoint_dir,
            checkpoint_uri,
            on_log,
            job_uri,
            input_uris or {},
        )


def _train(
    cfg: TrainConfig,
    paths: dict[str, str],
    checkpoint_dir: str,
    checkpoint_uri: str,
    on_log: Callable[[dict], None] | None,
    job_uri: str,
    input_uris: dict[str, str],
) -> TrainResult:
    model_dir, dataset_dir = paths["model_dir"], paths["dataset_dir"]
    verify(model_dir, "quantized-model")
    verify(dataset_dir, "dataset")
    _check_tokenizer(model_dir, dataset_dir)
    if cfg.train_runner in JOB_RUNNERS:
        from qlora_kfp.stages.train_job import TrainJobRunner

        runner = TrainJobRunner(job_uri, kind=cfg.train_runner)
        # Per node; the checkpoints record it with num_nodes (the global batch).
        cfg = dataclasses.replace(cfg, num_processes=runner.processes(cfg))
        if cfg.world_size > 1:  # DDP or FSDP over every node's processes, decided here
            cfg = decide_parallelism(cfg, model_dir, dataset_dir)
        made_from = _made_from(cfg, model_dir, dataset_dir)
        return runner.train(cfg, paths, made_from, checkpoint_uri, on_log, input_uris)
    # The resolved count: the checkpoints record it (another count is another global batch).
    cfg = dataclasses.replace(cfg, num_processes=distributed.world_size(cfg))
    if cfg.num_processes > 1:  # the resolved mode too: a checkpoint of the other is not resumed
        cfg = decide_parallelism(cfg, model_dir, dataset_dir)
    ckpt_root = Path(checkpoint_dir or f"{paths['output_dir']}.checkpoints")
    made_from = _made_from(cfg, model_dir, dataset_dir)
    # Here, in one process: every rank then resumes from this same sealed checkpoint.
    resume_from = (
        resume.find_resume_point(ckpt_root, made_from, checkpoint_uri)
        if cfg.checkpoint_steps
        else None
    )
    where = dict(ckpt_root=str(ckpt_root), checkpoint_uri=checkpoint_uri, resume_from=resume_from)
    if cfg.num_processes > 1:
        job = dict(config=asdict(cfg), made_from=made_from, **paths, **where)
        res = distributed.launch("qlora_kfp.stages.train_ranks", job, cfg.num_processes, on_log)
        return TrainResult(**res)
    return train_here(cfg, **paths, made_from=made_from, **where, on_log=on_log)
