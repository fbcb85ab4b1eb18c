"""Checks that fail fast, before any long or GPU work, with a message that says what to fix.

Two checks: the services a run needs answer (:func:`check_services`), and training fits the
GPU's memory (:func:`check_memory`, from the model's ``config.json`` alone).
"""

from __future__ import annotations

import dataclasses
import logging

from qlora_kfp import env
from qlora_kfp.configs import TrainConfig
from qlora_kfp.errors import ConfigError
from qlora_kfp.storage import s3
from qlora_kfp.tracking import parent_run

log = logging.getLogger(__name__)
ARTIFACT_URI_ENV = "QLORA_KFP_ARTIFACT_URI"
# GPUs a GPU task gets (pipelines/platform.py sets it on every task from the compile-time
# QLORA_KFP_GPUS): the train task's processes when num_processes is 0.
GPUS_ENV = "QLORA_KFP_GPUS"
HEADROOM = 0.95  # share of the GPU the estimate may fill (as autofit.MARGIN: fragmentation)


def check_services() -> None:
    """The tracking server answers and the artifact bucket exists and accepts the credentials.

    Raises:
        TrackingError: MLflow is unreachable.
        SourceError: the bucket is missing, the credentials are wrong or S3 is unreachable.
    """
    parent_run.check_server()
    uri = env.text(ARTIFACT_URI_ENV)
    if uri:
        s3.check_access(uri)


def check_targets(model_cfg, cfg: TrainConfig) -> None:
    """Refuse ``target_modules`` the model does not have, here rather than in the GPU task,
    where the error would come after the model's download and load (a deterministic error is
    never retried, but it still costs that). The model is built on the meta device: no
    weights, any size in milliseconds.

    Raises:
        ConfigError: naming the missing modules and the ones the model has.
    """
    from qlora_kfp.training.modeling import meta_model
    from qlora_kfp.training.peft_model import check_target_modules

    model = meta_model(model_cfg)
    if model is None:  # e.g. the model's own code: the train task checks
        log.info("target_modules not checked before training: the model cannot be built here")
        return
    check_target_modules(model, cfg)


def check_memory(
    base_model: str,
    cfg: TrainConfig,
    max_seq_length: int,
    gpu_memory_gib: float,
    quant_storage: str = "",
) -> dict[str, float]:
    """Estimate peak training memory on one GPU and fail when it cannot fit.

    With several processes (``num_processes``, or 0 and ``QLORA_KFP_GPUS`` above 1) the
    figure is still one GPU's, at the per-GPU batch, under the ``parallelism`` the train
    stage will use (``parallelism.decide``, the same function): under DDP each GPU holds the
    whole model, plus DDP's gradient buckets; under FSDP a share of the weights and
    optimizer state plus the layers being gathered.

    Args:
        base_model: Hub id, local folder or ``s3://`` URI; only its ``config.json`` is read.
        cfg: The train stage's config (batch, rank, checkpointing, packing, kernels).
        max_seq_length: Longest row, from the prepare stage's config.
        gpu_memory_gib: The GPU's memory.
        quant_storage: The quantize stage's, checked when training will use FSDP ("": not
            checked).

    Returns:
        The estimate's parts in GiB (their sum is what must fit).

    Raises:
        ConfigError: training cannot fit, or FSDP cannot shard the 4-bit weights; the
            message names the setting that would.
    """
    from transformers import AutoConfig

    from qlora_kfp.storage import sources
    from qlora_kfp.training import autofit, fsdp, memory, parallelism

    model_cfg = AutoConfig.from_pretrained(sources.model_source(base_model))
    check_targets(model_cfg, cfg)
    world = cfg.num_processes or env.integer(GPUS_ENV)
    cfg = dataclasses.replace(cfg, num_processes=world)  # what the train task resolves
    # Training runs on the GPU image, whose torch has the varlen kernel: the plan and the
    # estimate are made for it (this pod has no GPU, so none of its own).
    varlen = True
    # A bin holds pack_length tokens; other modes hold rows of at most max_seq_length.
    seq = cfg.pack_length if cfg.packing == "bins" and cfg.pack_length else max_seq_length
    mode = parallelism.decide(model_cfg, cfg, seq, gpu_memory_gib, float("inf"), has_varlen=varlen)
    cfg = mode.resolve(cfg)
    if mode.mode != "none":
        log.info("%d processes, %s", world, mode.summary())
    if mode.mode == "fsdp" and quant_storage:  # training runs on GPUs
        fsdp.check_storage(
            quant_storage, cfg.compute_dtype, True, "the quantize stage", mode.describe()
        )
    kw = autofit.estimate_kwargs(model_cfg, cfg, has_varlen=varlen)
    # What the train stage will decide: the same function on the same inputs, except the
    # training pod's host memory, which is not known here (auto may offload).
    plan = autofit.plan(model_cfg, cfg, seq, gpu_memory_gib, float("inf"), has_varlen=varlen)
    chosen, total = plan.chosen, plan.total_layers
    est = autofit.setting_estimate(model_cfg, cfg, seq, chosen, has_varlen=varlen)
    log.info(
        "estimated peak memory of each of %d GPU(s) for batch %d x %d tokens with %s:\n%s",
        world,
        cfg.batch_size,
        seq,
        chosen.describe(total),
        est.table(),
    )
    budget = HEADROOM * gpu_memory_gib
    fewest = None
    offload = chosen.offload or cfg.gradient_checkpointing_offload != "off"
    if cfg.gradient_checkpointing:
        fewest = memory.fewest_checkpointed_layers(
            model_cfg, seq, cfg.batch_size, cfg.lora_r, budget, offload=offload, **kw
        )
    if est.total_gib > budget:
        least = {**kw, "gradient_checkpointing_layers": -1, "offload": True}
        fits = memory.largest_batch(model_cfg, seq, cfg.lora_r, budget, **least)
        if fewest is not None:  # only fewer layers keeping their activations fit
            hint = f"use gradient_checkpointing_layers={fewest} (or auto)" + (
                " with gradient_checkpointing_offload=on" if offload and fewest else ""
            )
        elif mode.mode == "ddp" and mode.fsdp_gib <= budget:  # set to ddp: FSDP fits
            hint = f"use parallelism=fsdp (or auto), about {mode.fsdp_gib} GiB of each GPU"
        elif fits:
            hint = (
                f"use batch_size={fits} with gradient_accumulation_steps="
                f"{-(-cfg.batch_size // fits)}"
            )
        else:
            hint = "lower max_seq_length or use a GPU with more memory"
        raise ConfigError(
            f"training needs about {est.total_gib} GiB but the GPU has "
            f"{gpu_memory_gib} GiB; {hint}\n{est.table()}"
        )
    layers = cfg.checkpointed_layers
    if layers is not None and fewest is not None and (layers < 0 or fewest < min(layers, total)):
        log.info(
            "this GPU also fits gradient_checkpointing_layers=%d (now %d): fewer layers "
            "recompute their activations, which trains faster (auto picks the fewest)",
            fewest,
            layers,
        )
    return est.parts_gib
