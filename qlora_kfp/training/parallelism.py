"""DDP or FSDP for several training processes: ``parallelism=auto``, decided from the estimate.

Under DDP every GPU holds the whole 4-bit model, its own LoRA copy and optimizer state: the
fastest way to train, while one GPU fits it. Under FSDP (:mod:`qlora_kfp.training.fsdp`) the
packed 4-bit weights, the LoRA weights and the optimizer state are split over the GPUs and
each decoder layer is gathered while it runs: more traffic, for a model that one GPU does
not fit. ``auto`` takes DDP when one GPU's DDP estimate (``memory.estimate`` with the
checkpointing ``autofit.plan`` would choose) fits the budget, else FSDP.

One function decides (:func:`decide`): the preflight calls it to report and check what the
train stage will do, the train stage to do it, both on ``gpu_memory_gib`` as the budget. The
train stage decides once, in its own process before any rank starts (so no process touches a
GPU to decide, and every rank trains the same way), and the checkpoints record the mode it
chose: a checkpoint of the other mode is never resumed, as its files differ.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from qlora_kfp.configs import TrainConfig
from qlora_kfp.training import autofit


@dataclass(frozen=True)
class ParallelPlan:
    """What several processes do, with one GPU's estimate under each mode (GiB).

    ``mode``: ``none`` (one process), ``ddp`` or ``fsdp``; the estimates are 0.0 with one
    process.
    """

    mode: str
    ddp_gib: float
    fsdp_gib: float
    budget_gib: float
    chosen_by_auto: bool

    def resolve(self, cfg: TrainConfig) -> TrainConfig:
        """``cfg`` with ``parallelism`` set to the mode (unchanged with one process)."""
        if self.mode == "none":
            return cfg
        return dataclasses.replace(cfg, parallelism=self.mode)

    def describe(self) -> str:
        """The mode and why, for logs and errors: ``parallelism=fsdp`` when set, else e.g.
        ``parallelism=auto chose fsdp (one GPU under DDP: 46.18 GiB, over 95% of
        gpu_memory_gib=40; under FSDP: 37.11 GiB)``."""
        if self.mode == "none":
            return "one process"
        if not self.chosen_by_auto:
            return f"parallelism={self.mode}"
        fits = "within" if self.mode == "ddp" else "over"
        return (
            f"parallelism=auto chose {self.mode} (one GPU under DDP: {self.ddp_gib} GiB, {fits} "
            f"{autofit.MARGIN:.0%} of gpu_memory_gib={self.budget_gib:g}; under FSDP: "
            f"{self.fsdp_gib} GiB)"
        )

    def summary(self) -> str:
        """:meth:`describe`, with both estimates (the log line of the preflight and the
        train stage)."""
        if self.mode == "none" or self.chosen_by_auto:
            return self.describe()
        return (
            f"{self.describe()} (one GPU under DDP: {self.ddp_gib} GiB, under FSDP: "
            f"{self.fsdp_gib} GiB)"
        )


def decide(
    model_cfg,
    cfg: TrainConfig,
    seq_len: int,
    budget_gib: float,
    host_free_gib: float,
    *,
    has_varlen: bool | None,
) -> ParallelPlan:
    """DDP or FSDP for ``cfg.world_size`` processes (every node's; ``none`` for one).

    Args:
        model_cfg: The model's config (its shapes).
        cfg: The train stage's config, ``num_processes`` resolved.
        seq_len: The longest row (a bin's capacity with ``packing=bins``).
        budget_gib: One GPU's memory (``gpu_memory_gib``).
        host_free_gib: Host memory each process may pin (``inf`` when unknown).
        has_varlen: As :func:`qlora_kfp.training.autofit.plan`'s.
    """
    if cfg.world_size <= 1:
        return ParallelPlan("none", 0.0, 0.0, budget_gib, False)

    def estimate(mode: str) -> float:
        resolved = dataclasses.replace(cfg, parallelism=mode)
        plan = autofit.plan(
            model_cfg, resolved, seq_len, budget_gib, host_free_gib, has_varlen=has_varlen
        )
        return plan.chosen.estimate_gib

    ddp, fsdp = estimate("ddp"), estimate("fsdp")
    if cfg.parallelism != "auto":
        return ParallelPlan(cfg.parallelism, ddp, fsdp, budget_gib, False)
    mode = "ddp" if ddp <= autofit.MARGIN * budget_gib else "fsdp"
    return ParallelPlan(mode, ddp, fsdp, budget_gib, True)
