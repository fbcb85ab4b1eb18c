"""The train stage's training in one process: the only one, or one rank of several.

:func:`qlora_kfp.stages.train.run_train` checks the inputs and finds the checkpoint to resume
from, then calls :func:`train_here` itself (one process) or starts one process per GPU that
each call it (:mod:`qlora_kfp.stages.train_ranks`). Here: the model, the Trainer, the
``auto`` memory settings and their fallback, the adapter and its record.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from qlora_kfp.configs import TrainConfig
from qlora_kfp.errors import ConfigError, TrainingDivergedError
from qlora_kfp.storage import artifacts
from qlora_kfp.storage.manifest import atomic_folder
from qlora_kfp.training import (
    attention,
    autofit,
    batching,
    distributed,
    fsdp,
    modeling,
    resume,
    trainer_hooks,
)
from qlora_kfp.training.peft_model import (
    build_peft_model,
    check_finite_adapter,
    resolve_optimizer,
    trainable_params,
    use_fused_kernels,
)

# The stage's logger, as before the stage was split in two: pod logs keep their names.
log = logging.getLogger("qlora_kfp.stages.train")


@dataclass
class TrainResult:
    """The adapter folder, the final metrics and every logged row."""

    path: str
    metrics: dict
    history: list[dict]


def plan_length(cfg: TrainConfig, rows) -> int:
    """The row length memory is planned for: a bin's capacity with ``packing=bins``
    (``pack_length``, else the longest row), else the longest row."""
    longest = max(len(r["input_ids"]) for r in rows)
    return (cfg.pack_length or longest) if cfg.packing == "bins" else longest


def memory_settings(
    cfg: TrainConfig, model_dir: str, rows: list[dict], capacity: int, gpu_budget_gib: float
) -> autofit.CheckpointPlan:
    """The checkpointing to train with (``autofit.plan``, on this machine's figures).

    ``rows``: the training rows (bins with ``packing=bins``); ``capacity``: a bin's tokens.
    """
    from transformers import AutoConfig

    seq = capacity or max(len(r["input_ids"]) for r in rows)
    # Several ranks share the pod's host memory (offloaded inputs are pinned there).
    host = autofit.host_available_gib() / max(cfg.num_processes, 1)
    if modeling.device() != "cuda":  # the CPU trains in host memory
        gpu_budget_gib = min(gpu_budget_gib, host)
    model_cfg = AutoConfig.from_pretrained(model_dir)
    # The attention this machine trains with (build_peft_model resolves it the same way).
    varlen = attention.kernel() is not None
    return autofit.plan(model_cfg, cfg, seq, gpu_budget_gib, host, has_varlen=varlen)


def train_in_memory(model, plan: autofit.CheckpointPlan, new_trainer, resume_from, reset):
    """``new_trainer().train(resume_from)`` under the first of the plan's settings that does not run
    out of memory in its first steps; each retry starts from the very beginning (the initial
    adapter, a fresh Trainer and optimizer, ``reset()``). Each setting reaches the model here
    (``autofit.apply``), before its attempt.

    Returns:
        (the Trainer, its ``train()`` output, the setting used).
    """
    import gc

    import torch

    # The initial adapter, for a restart (none is possible with one setting).
    initial = (
        {n: p.detach().to("cpu", copy=True) for n, p in trainable_params(model)}
        if len(plan.settings) > 1
        else {}
    )
    box: list = []

    def apply(setting: autofit.Setting) -> None:  # no-op without gradient_checkpointing
        autofit.apply(model, setting)

    def start():
        box[:] = [new_trainer()]
        return box[0].train(resume_from_checkpoint=resume_from)

    def restart():
        box.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            # The run's reported peak is the attempt that fits, not the one that ran out.
            torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            for n, p in trainable_params(model):
                p.copy_(initial[n])
                p.grad = None
        reset()

    first = int(Path(resume_from).name.split("-")[1]) if resume_from else 0

    def steps_done() -> int:
        return box[0].state.global_step - first if box else 0

    out, setting = autofit.train_fitting(
        plan.settings, apply, start, restart, steps_done, plan.total_layers
    )
    return box[0], out, setting


def train_here(
    cfg: TrainConfig,
    model_dir: str,
    dataset_dir: str,
    output_dir: str,
    made_from: dict,
    ckpt_root: str,
    checkpoint_uri: str,
    resume_from: str | None,
    on_log: Callable[[dict], None] | None,
) -> TrainResult:
    """:func:`run_train`'s training in this process: the only one, or one rank of
    ``cfg.num_processes`` (:mod:`qlora_kfp.training.distributed`), where rank 0 alone writes
    the adapter and seals checkpoints. Arguments as :func:`run_train`'s, checked by it;
    ``cfg.parallelism`` resolved (DDP, or FSDP: :mod:`qlora_kfp.training.fsdp`)."""
    import torch
    from transformers import AutoTokenizer, Trainer, TrainingArguments, set_seed

    from qlora_kfp.tracking.plots import loss_curve

    expandable = modeling.prefer_expandable_segments()
    # Every process of the group, on this node and the others (a TrainJob's nodes).
    ranks, main = distributed.current_world(), distributed.is_main()
    if torch.cuda.is_available():  # this rank's GPU; the model loads onto the current one
        torch.cuda.set_device(distributed.local_rank())
    gpu_budget = autofit.budget_gib(cfg)  # before the model takes its share
    train_ds = artifacts.token_rows(dataset_dir, "train")
    eval_ds = artifacts.token_rows(dataset_dir, "eval")
    tokenizer = AutoTokenizer.from_pretrained(Path(dataset_dir) / "tokenizer")
    set_seed(cfg.seed)
    dtype = modeling.resolve_dtype(cfg.compute_dtype)
    model = build_peft_model(cfg, model_dir)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    sharded = ranks > 1 and cfg.parallelism == "fsdp"
    if sharded:
        fsdp.keep_weight_layout(model)

    tokens_seen = [0]  # real tokens of the batches training steps have consumed (this rank)

    capacity = 0
    if cfg.packing == "bins":
        capacity = plan_length(cfg, train_ds)
        try:
            bins = batching.packed_rows(train_ds, capacity)
        except ValueError as exc:
            raise ConfigError(f"{exc}; raise pack_length or use 0 (the longest row)") from None
        log.info("packed %d rows into %d bins of <= %d tokens", len(train_ds), len(bins), capacity)
        train_ds = bins
    # The count rides with its batch: the data loader runs a batch ahead of training, so a
    # count taken at collation time would credit a step with its successor's tokens.
    collate = batching.make_collator(cfg.packing, tokenizer, width=capacity, count_tokens=True)

    # With several ranks the plan has no fallback: one rank starting over alone would leave
    # the others waiting in a collective. The error names the settings to change.
    plan = memory_settings(cfg, model_dir, train_ds, capacity, gpu_budget)
    history: list[dict] = []
    diverged: list[str] = []
    ckpt_root = Path(ckpt_root)
    cpu_ranks = ranks > 1 and modeling.device() != "cuda"
    # Rank 0 alone writes the adapter; the others train and evaluate alongside it.
    with atomic_folder(output_dir, "adapter") if main else contextlib.nullcontext() as tmp:
        args = TrainingArguments(
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
        if sharded and cpu_ranks:
            fsdp.accelerate_on_cpu(args)
        trainer_cls = trainer_hooks.counting_trainer(Trainer, tokens_seen)
        if sharded:
            trainer_cls = fsdp.sharded_trainer(trainer_cls)

        def new_trainer():
            return trainer_cls(
                model=model,
                args=args,
                train_dataset=train_ds,
                eval_dataset=eval_ds,
                data_collator=collate,
                callbacks=[
                    trainer_hooks.recorder(history, tokens_seen, diverged, on_log, ranks),
                    resume.callback(ckpt_root, made_from, checkpoint_uri),
                ],
            )

        def reset():  # what a fresh start has: nothing counted or logged, the seed's RNG
            tokens_seen[0] = 0
            history.clear()
            diverged.clear()
            set_seed(cfg.seed)

        with resume.saving(ckpt_root):  # a checkpoint cut off by a failure is removed
            trainer, out, setting = train_in_memory(model, plan, new_trainer, resume_from, reset)
        if diverged or not math.isfinite(out.training_loss):
            raise TrainingDivergedError(
                f"training diverged ({diverged[0] if diverged else 'loss is not finite'}); "
                "no adapter was written. Lower learning_rate, keep max_grad_norm small, or "
                "use compute_dtype=bfloat16 instead of float16"
            )
        final_eval = trainer.evaluate()  # the Recorder logs it into history too
        # Under FSDP the adapter is sharded: gathered (by every rank) onto rank 0 to be saved.
        adapter = fsdp.gathered_state(trainer.model) if sharded else None
        check_finite_adapter(model, adapter)  # a NaN adapter must never be sealed as complete
        if main:
            model.save_pretrained(tmp, state_dict=adapter)
            tokenizer.save_pretrained(tmp)
            (tmp / "history.json").write_text(json.dumps(history, indent=1))
            artifacts.write_train_record(
                tmp, asdict(cfg), made_from, artifacts.base_model_of(model_dir)
            )
            loss_curve(history, tmp / "loss_curve.png")
    if main:
        resume.remove_all(ckpt_root)  # the adapter is complete: no resume needed
    # Every rank's tokens (the logged rows count rank 0's times the ranks) and the largest
    # peak of any GPU.
    tokens = distributed.all_reduce([float(tokens_seen[0])])[0]
    losses = [h["loss"] for h in history if "loss" in h]
    metrics = {
        "resumed_from_step": int(Path(resume_from).name.split("-")[1]) if resume_from else 0,
        "train_loss": round(out.training_loss, 6),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "eval_loss": final_eval["eval_loss"],
        "steps": out.global_step,
        "trainable_params": trainable,
        "train_runtime_s": round(out.metrics["train_runtime"], 2),
        # Evaluation batches are not counted (CountingTrainer.prediction_step).
        "tokens_per_s": round(tokens / max(out.metrics["train_runtime"], 1e-9), 2),
    }
    metrics.update(
        checkpointed_layers=setting.layers,
        checkpoint_offload=int(setting.offload),
        estimated_peak_gib=setting.estimate_gib,
        memory_settings_tried=plan.settings.index(setting) + 1,
        expandable_segments=int(expandable),
    )
    metrics["processes"] = ranks
    if torch.cuda.is_available():
        peak = [torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()]
        peak = distributed.all_reduce([float(v) for v in peak], op="max")
        metrics["gpu_peak_gib"] = round(peak[0] / 2**30, 3)
        metrics["gpu_reserved_gib"] = round(peak[1] / 2**30, 3)
    log.info("trained: %s", metrics)
    return TrainResult(str(output_dir), metrics, history)
