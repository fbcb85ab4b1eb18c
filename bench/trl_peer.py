"""TRL's SFTTrainer as a measured peer of the train stage (``trainer=trl`` variants).

``train_bench.py`` runs a variant whose keys include ``trainer=trl`` here instead of through
``qlora_kfp.stages.train.run_train``: stock ``trl.SFTTrainer`` with a peft ``LoraConfig``, on
the same 4-bit model artifact (loaded as TRL users load a checkpoint,
``AutoModelForCausalLM.from_pretrained``; its ``config.json`` carries the nf4 / double-quant /
bf16-compute ``quantization_config`` the bench quantized it with), on the same token rows
(a ``datasets.Dataset`` of ``input_ids``; TRL copies them into ``labels``, as the baseline's
labels = inputs; no chat template: the rows are already tokens).

The variant's keys mean what they mean for the train stage, mapped onto TRL's flags:

=============  ===============================================================================
key            SFTConfig
=============  ===============================================================================
pack=bins      ``packing=True, packing_strategy="bfd", max_length=pl`` (padding-free implied)
pack=padding_  ``padding_free=True`` (``max_length=None``: TRL refuses one without packing;
free           the rows are already at most ``--seq`` long)
pack=off       padded batches (``max_length=pl`` when given)
gcl=-1 / all   ``gradient_checkpointing=True`` (every layer; TRL has no per-layer count)
gcl=0, gc=0    ``gradient_checkpointing=False``
off=on / off   ``activation_offloading=True / False`` (TRL offloads every saved activation;
               the stage offloads the inputs of checkpointed layers)
fused=on/off   ``use_liger_kernel`` (TRL applies Liger's layer kernels; its own fused LM head
               computes the loss)
opt=...        ``optim`` (``auto``: adamw_torch_fused on a GPU, as the stage resolves it)
bs, ga, steps  ``per_device_train_batch_size``, ``gradient_accumulation_steps``, ``max_steps``
r, alpha, drop ``LoraConfig(r, lora_alpha, lora_dropout, target_modules="all-linear")``
attn=...       the model's ``attn_implementation``, resolved as the stage resolves it (auto:
               the project's ``varlen`` flash kernel for packed rows on a GPU, registered
               with transformers' ``AttentionInterface``: TRL's padding-free batches carry the
               ``cu_seq_lens`` it reads; ``attn=sdpa`` for transformers' default)
lr             ``learning_rate`` (the recipe's 2e-4 unless given)
lora32=1       undo TRL's cast of the LoRA weights to bf16 on a quantized model (the stage
               keeps them in float32): for the equivalence test, not TRL's stock behavior
=============  ===============================================================================

The recipe's other settings (constant schedule, no warm-up, clipping 0.3, seed 1, logging
every step, no eval, no saving) are the train stage variants' (``train_bench.stage_config``).
Settings TRL has no flag for (auto or partial checkpointing, auto offload, ``fl``, ``up``,
several processes) are refused, so a peer never silently measures something else.

Measured as the train stage is: the same Recorder callback (``trainer_hooks.recorder``: a
row per logged step with its time and the real tokens trained on so far) and the same token
count (``trainer_hooks.counting_trainer``: each batch's non-padding tokens, counted in the
step that trains on them), peak allocated and reserved GPU memory after training.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

# TRL's switches for the stage's packing modes.
PACKING = {
    "bins": dict(packing=True, packing_strategy="bfd", padding_free=True),
    "padding_free": dict(packing=False, padding_free=True),
    "off": dict(packing=False, padding_free=False),
}
# Train-stage variant keys TRL has no flag for (set explicitly, they are refused).
NO_TRL_FLAG = {
    "fused_lora": "peft's own LoRA forward only",
    "fp8_base": "bitsandbytes' bf16 product of the 4-bit weights only",
    "fp32_upcast": "no upcast of the 16-bit weights",
    "num_processes": "one process (the bench runs no torchrun for it)",
    "gpu_memory_gib": "no memory planning (it only steers auto settings)",
}


def trl_settings(kw: dict, cfg: dict) -> dict:
    """What a variant asks of TRL: checkpointing, offload, packing, Liger, optimizer.

    ``kw``: the variant's own keys; ``cfg``: the recipe with them (``stage_config``).

    Raises:
        ValueError: a key TRL has no flag for, or a value (auto, a layer count) it cannot take.
    """
    from qlora_kfp.training.peft_model import resolve_optimizer, use_fused_kernels

    for key, why in NO_TRL_FLAG.items():
        if key in kw and not (key == "num_processes" and kw[key] == 1):
            raise ValueError(f"trainer=trl: {key} has no TRL flag ({why})")
    layers = cfg["gradient_checkpointing_layers"]
    if not cfg.get("gradient_checkpointing", True) or layers == "0":
        checkpointing = False
    elif layers in ("-1", "all"):
        checkpointing = True
    else:
        raise ValueError(f"trainer=trl: gcl={layers}; TRL checkpoints every layer or none (-1, 0)")
    offload = cfg["gradient_checkpointing_offload"]
    if offload not in ("on", "off"):
        raise ValueError(f"trainer=trl: off={offload}; TRL's activation offloading is on or off")
    packing = cfg.get("packing", "padding_free")
    if packing not in PACKING:
        raise ValueError(f"trainer=trl: pack={packing}; one of {sorted(PACKING)}")
    return dict(
        gradient_checkpointing=checkpointing,
        activation_offloading=offload == "on",
        use_liger_kernel=use_fused_kernels(cfg.get("fused_kernels", "auto")),
        optim=resolve_optimizer(cfg["optimizer"]),
        **PACKING[packing],
    )


def max_length(cfg: dict, rows: list[list[int]]) -> int | None:
    """TRL's ``max_length``: a bin's tokens with bins (``pl``, else the longest row); padded
    batches truncate at ``pl`` if given; padding-free takes none (TRL refuses one)."""
    packing = cfg.get("packing", "padding_free")
    if packing == "bins":
        return cfg.get("pack_length") or max(map(len, rows))
    if packing == "off":
        return cfg.get("pack_length") or None
    return None


def sft_config(kw: dict, cfg: dict, out: str, rows: list[list[int]]):
    """The SFTConfig of a variant (the recipe's values, TRL's flags for the rest)."""
    import torch
    from trl import SFTConfig

    from qlora_kfp.training import modeling

    on_gpu = modeling.device() == "cuda"
    dtype = modeling.resolve_dtype(cfg["compute_dtype"])
    packing = cfg.get("packing", "padding_free")
    return SFTConfig(
        output_dir=out,
        per_device_train_batch_size=cfg.get("batch_size", 4),
        gradient_accumulation_steps=cfg.get("gradient_accumulation_steps", 1),
        learning_rate=cfg["learning_rate"],
        lr_scheduler_type=cfg["lr_scheduler"],
        warmup_steps=0,
        num_train_epochs=cfg["num_epochs"],
        max_steps=cfg["max_steps"] or -1,
        max_grad_norm=cfg["max_grad_norm"],
        logging_steps=cfg["logging_steps"],
        logging_first_step=True,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        seed=cfg["seed"],
        data_seed=cfg["seed"],
        bf16=on_gpu and dtype == torch.bfloat16,
        fp16=on_gpu and dtype == torch.float16,
        max_length=max_length(cfg, rows),
        # Rows of tokens trained on whole (labels = inputs), no padding to a multiple.
        completion_only_loss=False,
        pad_to_multiple_of=None,
        # The stage's sampler: bins are all about pack_length long; other rows are grouped
        # by length unless group=0.
        train_sampling_strategy=(
            "group_by_length"
            if cfg.get("length_grouping", True) and packing != "bins"
            else "random"
        ),
        dataloader_num_workers=0,
        disable_tqdm=True,
        **trl_settings(kw, cfg),
    )


def read_rows(data_dir: str) -> list[list[int]]:
    """The training rows the train stage reads from the same dataset artifact."""
    from qlora_kfp.storage import artifacts

    return [r["input_ids"] for r in artifacts.token_rows(data_dir, "train")]


def load_model(model_dir: str, cfg: dict):
    """The 4-bit artifact as saved (its config.json holds the quantization config), loaded the
    way TRL users load a checkpoint, with the attention the stage would use."""
    import torch
    from transformers import AutoModelForCausalLM

    from qlora_kfp.training import attention, modeling

    attn = attention.resolve(cfg.get("attn_implementation", "auto"), cfg.get("packing", "off"))
    if attn == attention.NAME:
        attention.register()
    device = {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=modeling.resolve_dtype(cfg["compute_dtype"]),
        device_map=device,
        attn_implementation=attn,
    )
    return model, attn


def count_real_tokens(batch: dict) -> int:
    """A TRL batch's non-padding tokens: its attention mask where padded, else every token
    (a padding-free batch is one row of documents end to end, with ``pad_to_multiple_of``
    off nothing pads it)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


def run_trl(kw: dict, cfg: dict, model_dir: str, data_dir: str, out: str) -> dict:
    """One TRL run: ``{"m": metrics, "h": logged rows}``, the shape of a train-stage result."""
    import datasets
    import torch
    import trl
    from peft import LoraConfig
    from transformers import AutoTokenizer, set_seed
    from trl import SFTTrainer

    from qlora_kfp.training import batching, trainer_hooks

    rows = read_rows(data_dir)
    args = sft_config(kw, cfg, out, rows)
    tokenizer = AutoTokenizer.from_pretrained(Path(data_dir) / "tokenizer")
    train = datasets.Dataset.from_dict({"input_ids": rows})
    set_seed(cfg["seed"])  # the stage seeds before building its model and LoRA weights
    model, attn = load_model(model_dir, cfg)
    peft_config = LoraConfig(
        r=cfg["lora_r"],
        lora_alpha=cfg["lora_alpha"],
        lora_dropout=cfg["lora_dropout"],
        target_modules=cfg["target_modules"],
        bias="none",
        task_type="CAUSAL_LM",
    )
    tokens_seen, history, diverged = [0], [], []
    trainer_cls = trainer_hooks.counting_trainer(SFTTrainer, tokens_seen)
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[trainer_hooks.recorder(history, tokens_seen, diverged)],
    )
    if kw.get("lora_fp32"):
        with torch.no_grad():
            for p in trainer.model.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
    # TRL refuses a custom collator with padding-free batches: its own is wrapped after the
    # fact, so each batch carries its count to the step that trains on it (as the stage's).
    collate = trainer.data_collator

    def counted(features):
        batch = collate(features)
        batch[batching.REAL_TOKENS] = count_real_tokens(batch)
        return batch

    trainer.data_collator = counted
    result = trainer.train()
    lora = [p for p in trainer.model.parameters() if p.requires_grad]
    hf = trainer.model.get_base_model().config
    metrics = {
        "steps": result.global_step,
        "train_loss": round(result.training_loss, 6),
        "trainable_params": sum(p.numel() for p in lora),
        "lora_dtype": str(lora[0].dtype).removeprefix("torch."),
        "loaded_in_4bit": bool(getattr(trainer.model.get_base_model(), "is_loaded_in_4bit", False)),
        "train_runtime_s": round(result.metrics["train_runtime"], 2),
        "tokens_per_s": round(tokens_seen[0] / max(result.metrics["train_runtime"], 1e-9), 2),
        "checkpointed_layers": hf.num_hidden_layers if args.gradient_checkpointing else 0,
        "checkpoint_offload": int(args.activation_offloading),
        "attn_implementation": attn,
        "trl_version": trl.__version__,
        "diverged": diverged,
    }
    if torch.cuda.is_available():
        metrics["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        metrics["gpu_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
    return {"m": metrics, "h": history}


def main() -> None:
    """``python trl_peer.py '<json of kw, cfg, model_dir, data_dir, out>'``: prints RESULT."""
    a = json.loads(sys.argv[1])
    r = run_trl(a["kw"], a["cfg"], a["model_dir"], a["data_dir"], a["out"])
    print("RESULT " + json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
    from qlora_kfp import fast_exit

    fast_exit.at_exit_leave()  # results written: no module teardown
