"""The train stage's memory: which checkpointing it trains with, and the fallback when a
setting runs out of memory in its first steps.

``autofit`` decides and applies the settings from a model's shapes and a budget; here they
meet this process: the rows it trains on, this machine's GPU and host memory, and the Trainer
that each attempt starts afresh.
"""

from __future__ import annotations

from pathlib import Path

from qlora_kfp.configs import TrainConfig
from qlora_kfp.training import attention, autofit, modeling
from qlora_kfp.training.peft_model import trainable_params


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
