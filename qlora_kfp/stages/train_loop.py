"""The train stage's training in one process: the only one, or one rank of several.

:func:`qlora_kfp.stages.train.run_train` checks the inputs and finds the checkpoint to resume
from, then calls :func:`train_here` itself (one process) or starts one process per GPU that
each call it (:mod:`qlora_kfp.stages.train_ranks`). Here: the model, the Trainer, the
adapter and its record; the ``auto`` memory settings and their fallback are
:mod:`qlora_kfp.training.memory_fit`'s.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qlora_kfp.configs import TrainConfig
from qlora_kfp.errors import ConfigError, TrainingDivergedError
from qlora_kfp.storage import artifacts
from qlora_kfp.storage.manifest import atomic_folder
from qlora_kfp.training import (
    autofit,
    batching,
    distributed,
    fsdp,
    lora_inputs,
    memory_fit,
    modeling,
    resume,
    trainer_hooks,
)
from qlora_kfp.training.peft_model import (
    build_peft_model,
    check_finite_adapter,
    use_fused_kernels,
)
from qlora_kfp.training.trainer_args import training_arguments

# The stage's logger, as before the stage was split in two: pod logs keep their names.
log = logging.getLogger("qlora_kfp.stages.train")


@dataclass
class TrainResult:
    """The adapter folder, the final metrics and every logged row."""

    path: str
    metrics: dict
    history: list[dict]


@dataclass
class _Rows:
    """What the Trainer reads: the training rows (bins with ``packing=bins``), the eval rows,
    the tokenizer, a bin's capacity (0 without bins) and the collator."""

    train: list
    eval: list
    tokenizer: Any
    capacity: int
    collate: Callable


@dataclass
class _Log:
    """What training records as it goes: real tokens of the batches consumed (this rank),
    logged rows, and why it diverged (empty while it has not)."""

    tokens_seen: list = field(default_factory=lambda: [0])
    history: list = field(default_factory=list)
    diverged: list = field(default_factory=list)

    def reset(self, seed: int) -> None:
        """What a fresh start has: nothing counted or logged, the seed's RNG."""
        from transformers import set_seed

        self.tokens_seen[0] = 0
        self.history.clear()
        self.diverged.clear()
        set_seed(seed)


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
    """:func:`run_train`'s training in this process: the only one, or one rank of the group
    (:mod:`qlora_kfp.training.distributed`; a TrainJob's nodes too), where rank 0 alone writes
    the adapter and seals checkpoints. Arguments as :func:`run_train`'s, checked by it;
    ``cfg.parallelism`` resolved (DDP, or FSDP: :mod:`qlora_kfp.training.fsdp`)."""
    from transformers import set_seed

    expandable = modeling.prefer_expandable_segments()
    # Every process of the group, on this node and the others (a TrainJob's nodes).
    ranks = distributed.current_world()
    _use_this_ranks_gpu()
    gpu_budget = autofit.budget_gib(cfg)  # before the model takes its share
    rows = _read_rows(cfg, dataset_dir)
    set_seed(cfg.seed)
    model = build_peft_model(cfg, model_dir)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # before FSDP
    sharded = ranks > 1 and cfg.parallelism == "fsdp"
    if sharded:
        fsdp.keep_weight_layout(model)
    # With several ranks the plan has no fallback: one rank starting over alone would leave
    # the others waiting in a collective. The error names the settings to change.
    plan = memory_fit.memory_settings(cfg, model_dir, rows.train, rows.capacity, gpu_budget)
    ckpt = Path(ckpt_root)
    main = distributed.is_main()
    # Rank 0 alone writes the adapter; the others train and evaluate alongside it.
    with atomic_folder(output_dir, "adapter") if main else contextlib.nullcontext() as tmp:
        log_ = _Log()
        new_trainer = _trainer_factory(
            cfg, model, rows, ckpt, made_from, checkpoint_uri, log_, on_log, ranks, sharded
        )
        with resume.saving(ckpt):  # a checkpoint cut off by a failure is removed
            trainer, out, setting = memory_fit.train_in_memory(
                model, plan, new_trainer, resume_from, lambda: log_.reset(cfg.seed)
            )
        _refuse_divergence(out, log_.diverged)
        final_eval = trainer.evaluate()  # the Recorder logs it into history too
        # Under FSDP the adapter is sharded: gathered (by every rank) onto rank 0 to be saved.
        adapter = fsdp.gathered_state(trainer.model) if sharded else None
        check_finite_adapter(model, adapter)  # a NaN adapter must never be sealed as complete
        if main:
            _write_adapter(
                tmp, model, adapter, rows.tokenizer, log_.history, cfg, made_from, model_dir
            )
    if main:
        resume.remove_all(ckpt)  # the adapter is complete: no resume needed
    metrics = _metrics(
        ranks, trainable, out, final_eval, log_, setting, plan, resume_from, expandable
    )
    log.info("trained: %s", metrics)
    return TrainResult(str(output_dir), metrics, log_.history)


def _use_this_ranks_gpu() -> None:
    """The model loads onto the current GPU: make it this rank's."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(distributed.local_rank())


def _read_rows(cfg: TrainConfig, dataset_dir: str) -> _Rows:
    """The prepared dataset's rows, packed into bins with ``packing=bins``, and the collator
    that makes batches of them."""
    from transformers import AutoTokenizer

    train_ds = artifacts.token_rows(dataset_dir, "train")
    eval_ds = artifacts.token_rows(dataset_dir, "eval")
    tokenizer = AutoTokenizer.from_pretrained(Path(dataset_dir) / "tokenizer")
    capacity = 0
    if cfg.packing == "bins":
        capacity = memory_fit.plan_length(cfg, train_ds)
        try:
            bins = batching.packed_rows(train_ds, capacity)
        except ValueError as exc:
            raise ConfigError(f"{exc}; raise pack_length or use 0 (the longest row)") from None
        log.info("packed %d rows into %d bins of <= %d tokens", len(train_ds), len(bins), capacity)
        train_ds = bins
    # The count rides with its batch: the data loader runs a batch ahead of training, so a
    # count taken at collation time would credit a step with its successor's tokens.
    collate = batching.make_collator(cfg.packing, tokenizer, width=capacity, count_tokens=True)
    return _Rows(train_ds, eval_ds, tokenizer, capacity, collate)


def _trainer_factory(
    cfg: TrainConfig,
    model,
    rows: _Rows,
    ckpt: Path,
    made_from: dict,
    checkpoint_uri: str,
    log_: _Log,
    on_log: Callable[[dict], None] | None,
    ranks: int,
    sharded: bool,
) -> Callable[[], Any]:
    """A function making a fresh Trainer (one per memory setting tried), with the callbacks
    that record rows, guard against divergence and seal checkpoints."""
    from transformers import Trainer

    cpu_ranks = ranks > 1 and modeling.device() != "cuda"
    args = training_arguments(cfg, ckpt, cpu_ranks, sharded)
    if sharded and cpu_ranks:
        fsdp.accelerate_on_cpu(args)
    trainer_cls = trainer_hooks.counting_trainer(Trainer, log_.tokens_seen)
    if sharded:
        trainer_cls = fsdp.sharded_trainer(trainer_cls)

    def new_trainer():
        trainer = trainer_cls(
            model=model,
            args=args,
            train_dataset=rows.train,
            eval_dataset=rows.eval,
            data_collator=rows.collate,
            callbacks=[
                trainer_hooks.recorder(
                    log_.history, log_.tokens_seen, log_.diverged, on_log, ranks
                ),
                resume.callback(ckpt, made_from, checkpoint_uri),
            ],
        )
        which = autofit.recomputed_lora_inputs(model.config, cfg)
        if which:
            fused = use_fused_kernels(cfg.fused_kernels)
            trainer.add_callback(lora_inputs.callback(model, which, fused))
        return trainer

    return new_trainer


def _refuse_divergence(out, diverged: list[str]) -> None:
    """A run whose loss went NaN/Inf (or that the guard stopped) writes no adapter."""
    if diverged or not math.isfinite(out.training_loss):
        raise TrainingDivergedError(
            f"training diverged ({diverged[0] if diverged else 'loss is not finite'}); "
            "no adapter was written. Lower learning_rate, keep max_grad_norm small, or "
            "use compute_dtype=bfloat16 instead of float16"
        )


def _write_adapter(
    tmp: Path, model, adapter, tokenizer, history, cfg, made_from, model_dir
) -> None:
    """The adapter folder's files (into the atomic folder ``tmp``): weights and config, the
    tokenizer, the logged rows, the train record and the loss curve."""
    from qlora_kfp.tracking.plots import loss_curve

    model.save_pretrained(tmp, state_dict=adapter)
    tokenizer.save_pretrained(tmp)
    (tmp / "history.json").write_text(json.dumps(history, indent=1))
    artifacts.write_train_record(tmp, asdict(cfg), made_from, artifacts.base_model_of(model_dir))
    loss_curve(history, tmp / "loss_curve.png")


def _metrics(
    ranks, trainable, out, final_eval, log_: _Log, setting, plan, resume_from, expandable
) -> dict:
    """The run's figures: losses, steps, speed over every rank, the memory setting used and
    the largest GPU peak of any rank."""
    import torch

    # Every rank's tokens (the logged rows count rank 0's times the ranks).
    tokens = distributed.all_reduce([float(log_.tokens_seen[0])])[0]
    losses = [h["loss"] for h in log_.history if "loss" in h]
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
    expands = modeling.allocator_expands()  # None without CUDA: what was asked for, then
    metrics.update(
        checkpointed_layers=setting.layers,
        checkpoint_offload=int(setting.offload),
        estimated_peak_gib=setting.estimate_gib,
        memory_settings_tried=plan.settings.index(setting) + 1,
        expandable_segments=int(expandable if expands is None else expands),
    )
    metrics["processes"] = ranks
    if torch.cuda.is_available():
        peak = [torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()]
        peak = distributed.all_reduce([float(v) for v in peak], op="max")
        metrics["gpu_peak_gib"] = round(peak[0] / 2**30, 3)
        metrics["gpu_reserved_gib"] = round(peak[1] / 2**30, 3)
        for where, gib in modeling.reserved_by_stream().items():
            metrics[f"gpu_reserved_{where}_gib"] = gib
    return metrics
