"""FSDP-QLoRA: the frozen 4-bit base sharded over the train stage's processes.

transformers' Trainer shards the model with FSDP2 (``fully_shard`` on each decoder layer and
on the whole model, through accelerate) when its arguments ask for it
(:func:`trainer_arguments`). FSDP shards floating-point parameters only: the 4-bit weights
must be stored in a float dtype (``quant_storage``; the same packed bytes under another
tensor dtype), else accelerate leaves them whole on every GPU (:func:`check_storage`
refuses that). What else differs from DDP, and why it is handled here:

* the quantization constants (absmax, code book) stay whole on every GPU: bitsandbytes
  keeps a copy on each 4-bit module and gives it back to the gathered weight in ``forward``;
* under bf16/fp16 training FSDP casts every parameter it gathers to that dtype: the storage
  dtype must be the same one, or the packed bytes would be converted as numbers;
* bitsandbytes' CPU inference path repacks a weight in place and marks its quantization
  constants as repacked; FSDP gathers the original bytes again for the next forward, which
  would then be read in the repacked layout (:func:`keep_weight_layout`);
* the weights are sharded tensors: the adapter is gathered before it is saved
  (:func:`gathered_state`), by every rank, and written by rank 0.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from qlora_kfp.errors import ConfigError

log = logging.getLogger(__name__)
UINT8 = "uint8"


def storage_of(model_dir: str) -> str:
    """The tensor dtype of a 4-bit model's packed weights (``config.json`` records it)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    quant = config.get("quantization_config") or {}
    return str(quant.get("bnb_4bit_quant_storage") or UINT8).removeprefix("torch.")


def mixed_precision(compute_dtype: str, on_gpu: bool) -> str | None:
    """The dtype the Trainer trains in under autocast (bf16/fp16 on a GPU only), or None."""
    if not on_gpu:
        return None
    dtype = "bfloat16" if compute_dtype == "auto" else compute_dtype
    return dtype if dtype in ("bfloat16", "float16") else None


def check_storage(storage: str, compute_dtype: str, on_gpu: bool, where: str, why: str) -> None:
    """Refuse a 4-bit model FSDP cannot shard, or would corrupt by casting.

    Args:
        storage: The model's ``quant_storage``.
        compute_dtype: The train stage's ``compute_dtype``.
        on_gpu: Whether training runs on GPUs (mixed precision is used there only).
        where: The model, for the message.
        why: How FSDP was chosen (``ParallelPlan.describe``).

    Raises:
        ConfigError: one line, saying to re-quantize with the right ``quant_storage``.
    """
    cast = mixed_precision(compute_dtype, on_gpu)
    if storage == UINT8:
        raise ConfigError(
            f"{why} needs 4-bit weights stored in a float dtype FSDP can shard, but {where} "
            f"stores them as uint8: re-quantize with quant_storage={cast or 'bfloat16'}, or "
            "use parallelism=ddp"
        )
    if cast and storage != cast:
        raise ConfigError(
            f"{why} casts the weights it gathers to the compute dtype {cast}, which would "
            f"convert the 4-bit bytes {where} stores as {storage}: re-quantize with "
            f"quant_storage={cast}"
        )


def trainer_arguments() -> dict:
    """``TrainingArguments`` keywords for FSDP2 over the model's decoder layers."""
    return dict(
        fsdp=True,
        fsdp_config={
            "version": 2,
            # Each of the model's ``_no_split_modules`` (its decoder layer) is one shard group.
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            # Checkpoints hold the whole LoRA state in one file (``pytorch_model_fsdp.bin``),
            # not a folder per rank: a checkpoint stays a folder of known files.
            "state_dict_type": "FULL_STATE_DICT",
            "reshard_after_forward": True,
        },
    )


def accelerate_on_cpu(args) -> None:
    """Let FSDP run on the CPU with gloo (the tests' processes), as it does on GPUs.

    accelerate applies its FSDP plugin only to process groups of GPU-like kinds: on the CPU
    the Trainer would train DDP instead, without a word. The process group is set up by
    ``args.device``; marking its kind a GPU one sends the Trainer down the FSDP path, where
    nothing else assumes CUDA. :func:`sharded_trainer` checks that FSDP is on.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    _ = args.device  # accelerate's process state, created once per process
    PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU


def keep_weight_layout(model) -> int:
    """Turn off bitsandbytes' in-place CPU repacking of 4-bit weights (see the module).

    Returns:
        The 4-bit modules changed.
    """
    import bitsandbytes as bnb

    mods = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for m in mods:
        m.support_avx512bf16_for_cpu = False
    return len(mods)


def gathered_state(model, adapter_only: bool = True) -> dict:
    """The model's full state dict on rank 0's CPU (``{}`` on the other ranks).

    A collective: every rank calls it. ``adapter_only``: the trainable (LoRA) tensors, as
    peft saves them; else every tensor, each 4-bit weight with its quantization constants
    under the names ``save_pretrained`` gives them.
    """
    import bitsandbytes as bnb
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=adapter_only
    )
    state = get_model_state_dict(model, options=options)
    if adapter_only or not state:
        return state
    # The sharded weight lost its quantization constants; the module kept them.
    for name, mod in model.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit) and mod.quant_state is not None:
            for key, value in mod.quant_state.as_dict(packed=True).items():
                state[f"{name}.weight.{key}"] = value.detach().cpu()
    return state


def sharded_trainer(trainer_cls):
    """``trainer_cls`` that checks FSDP is on and saves checkpoints' adapters from
    :func:`gathered_state` (the Trainer's own save would gather the whole 4-bit model onto
    rank 0 at every checkpoint, only to keep its LoRA tensors)."""

    class ShardedTrainer(trainer_cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if not self.is_fsdp_enabled:
                raise RuntimeError("parallelism=fsdp, but accelerate did not enable FSDP")

        def save_model(self, output_dir=None, _internal_call=False):
            state = gathered_state(self.model)
            if self.args.should_save:
                self._save(output_dir or self.args.output_dir, state_dict=state)

    return ShardedTrainer
