"""The train stage's ``transformers.TrainingArguments``, from its config: one place that says
which of the Trainer's switches the stage sets, and why each departs from the default."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from qlora_kfp.configs import TrainConfig
from qlora_kfp.training import fsdp, modeling
from qlora_kfp.training.peft_model import resolve_optimizer, use_fused_kernels


def training_arguments(cfg: TrainConfig, ckpt_root: Path, cpu_ranks: bool, sharded: bool) -> Any:
    """The Trainer's arguments for one train stage.

    Args:
        cfg: The stage configuration.
        ckpt_root: Where the Trainer writes its resumable checkpoints.
        cpu_ranks: Several processes on the CPU (the tests): gloo instead of NCCL.
        sharded: FSDP-QLoRA (``parallelism=fsdp`` with several processes).

    Returns:
        A ``transformers.TrainingArguments``.
    """
    import torch
    from transformers import TrainingArguments

    dtype = modeling.resolve_dtype(cfg.compute_dtype)
    return TrainingArguments(
        output_dir=str(ckpt_root),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        # transformers' constant ignores the warmup: warmup_ratio > 0 asks for one.
        lr_scheduler_type=(
            "constant_with_warmup"
            if cfg.lr_scheduler == "constant" and cfg.warmup_ratio > 0
            else cfg.lr_scheduler
        ),
        warmup_steps=cfg.warmup_ratio,
        num_train_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps or -1,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim=resolve_optimizer(cfg.optimizer),
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if cfg.eval_steps else "no",
        eval_steps=cfg.eval_steps or None,
        save_strategy="steps" if cfg.checkpoint_steps else "no",
        save_steps=cfg.checkpoint_steps or 500,
        save_total_limit=2,
        report_to="none",
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=dtype == torch.bfloat16 and modeling.device() == "cuda",
        fp16=dtype == torch.float16 and modeling.device() == "cuda",
        # autofit.apply sets checkpointing up layer by layer; the Trainer's own switch
        # would turn it back on in every layer.
        gradient_checkpointing=False,
        remove_unused_columns=False,
        # Bins are all about pack_length long: grouping them by length would do nothing.
        train_sampling_strategy=(
            "group_by_length" if cfg.length_grouping and cfg.packing != "bins" else "random"
        ),
        use_liger_kernel=use_fused_kernels(cfg.fused_kernels),
        dataloader_num_workers=0,
        # Every LoRA weight gets a gradient each step: DDP need not search the graph
        # for unused ones (the Trainer would, as the peft model is no PreTrainedModel).
        ddp_find_unused_parameters=False,
        # Several CPU processes (the tests): accelerate forms a gloo group only when told
        # the run is on the CPU. On GPUs the backend is NCCL.
        use_cpu=cpu_ranks,
        ddp_backend="gloo" if cpu_ranks else None,
        # A pod log is no terminal: progress comes as one line per logging step instead.
        disable_tqdm=not sys.stderr.isatty(),
        **(fsdp.trainer_arguments() if sharded else {}),
    )
