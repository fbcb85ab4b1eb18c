"""The model QLoRA trains: the frozen 4-bit base prepared for training, with LoRA adapters.

What the train stage builds before its Trainer starts (:func:`build_peft_model`), and the
checks and choices around it: which modules to adapt, the optimizer, the Liger kernels, a
finite adapter before it is sealed.
"""

from __future__ import annotations

import logging

from qlora_kfp.configs import TrainConfig
from qlora_kfp.errors import ConfigError, TrainingDivergedError
from qlora_kfp.training import attention, fp8_base, lora_fused, modeling

log = logging.getLogger(__name__)


def check_target_modules(model, cfg: TrainConfig) -> None:
    """Fail with the available names when a requested target module is not in the model."""
    wanted = cfg.target_module_list
    if wanted == "all-linear":
        return
    leaves = {
        name.rsplit(".", 1)[-1]
        for name, mod in model.named_modules()
        if not list(mod.children()) and hasattr(mod, "weight")
    }
    missing = sorted(set(wanted) - leaves)
    if missing:
        raise ConfigError(
            f"target_modules {missing} are not in the model; it has "
            f"{sorted(leaves)} (or use all-linear)"
        )


def lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_module_list,
        use_dora=cfg.use_dora,
        use_rslora=cfg.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def prepare_model(model, cfg: TrainConfig):
    """Freeze the base, enable checkpointing and, with ``fp32_upcast``, do what peft does.

    peft's ``prepare_model_for_kbit_training`` casts every 16-bit weight (embeddings, norms,
    the head: 4 GiB on 8B shapes) to float32. The residual stream then runs in float32 and the
    fused cross-entropy multiplies by a float32 head, off the tensor cores. Without it those
    weights stay in ``compute_dtype``; the LoRA weights are float32 either way (peft's
    ``autocast_adapter_dtype``), so the optimizer state keeps its precision.

    With ``gradient_checkpointing`` every layer is checkpointed here; which layers stay so,
    and whether they offload, is the train stage's plan (``autofit.plan``), which it applies
    with ``autofit.apply`` before training.
    """
    from peft import prepare_model_for_kbit_training

    kw = {"use_reentrant": False}
    if cfg.fp32_upcast:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs=kw,
        )
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        if cfg.gradient_checkpointing:  # non-reentrant: no input-grad hook needed
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    return model


def build_peft_model(cfg: TrainConfig, model_dir: str):
    """The 4-bit model in ``model_dir``, prepared for training, with fresh LoRA adapters."""
    from peft import get_peft_model

    dtype = modeling.resolve_dtype(cfg.compute_dtype)
    attn = attention.resolve(cfg.attn_implementation, cfg.packing)
    if attn == attention.NAME:
        attention.register()
    model = modeling.load_model(model_dir, dtype=dtype, attn_implementation=attn)
    check_target_modules(model, cfg)
    model.config.use_cache = False  # with a KV cache transformers ignores packed documents
    model = get_peft_model(prepare_model(model, cfg), lora_config(cfg))
    if cfg.fused_lora:
        log.info("fused LoRA updates in %d layers", lora_fused.fuse_lora_updates(model))
    if fp8_base.resolve(cfg.fp8_base):
        log.info("FP8 base products in %d Linears", fp8_base.use_fp8(model))
    log.info("attention: %s", attn)
    return model


def use_fused_kernels(mode: str) -> bool:
    """``auto``: Liger kernels on a GPU when liger-kernel is installed (they are Triton-only)."""
    if mode != "auto":
        return mode == "on"
    import importlib.util

    return modeling.device() == "cuda" and importlib.util.find_spec("liger_kernel") is not None


def resolve_optimizer(name: str) -> str:
    if name != "auto":
        return name
    # torch's fused AdamW: the same 32-bit AdamW as the seeds' paged_adamw_32bit, one kernel
    # for all LoRA tensors. Paging the state to host memory buys little here (r=64 on 8B shapes:
    # 1.3 GiB of state) and measured 7-10% slower steps (BENCHMARKS.md). Paged optimizers stay
    # a choice (optimizer=paged_adamw_32bit). The CPU gets the plain torch AdamW.
    return "adamw_torch_fused" if modeling.device() == "cuda" else "adamw_torch"


def check_finite_adapter(model, gathered: dict | None = None) -> None:
    """Fail when a trained LoRA weight is NaN or Inf (losses can look finite while weights
    are not, e.g. under an extreme weight decay). ``gathered``: the adapter's tensors where
    the model holds shards of them (FSDP: the whole adapter on rank 0, none elsewhere)."""
    import torch

    tensors = (
        gathered.items()
        if gathered is not None
        else ((n, p) for n, p in model.named_parameters() if p.requires_grad)
    )
    bad = [n for n, p in tensors if not torch.isfinite(p).all()]
    if bad:
        raise TrainingDivergedError(
            f"training diverged: {len(bad)} adapter weights are NaN or Inf (first: {bad[0]}); "
            "no adapter was written. Lower learning_rate or weight_decay"
        )


def trainable_params(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
