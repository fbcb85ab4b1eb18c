"""Loading models (16-bit and 4-bit), batching and loss: shared by every stage."""

from __future__ import annotations

import logging

from qlora_kfp.errors import ArtifactError, SourceError
from qlora_kfp.storage import sources

log = logging.getLogger(__name__)


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(name: str):
    """``auto`` means bfloat16 on a GPU and float32 on the CPU (bitsandbytes' CPU kernels are
    about 3x faster in float32 than in bfloat16)."""
    import torch

    if name == "auto":
        return torch.bfloat16 if device() == "cuda" else torch.float32
    return getattr(torch, name)


def bnb_config(
    quant_type: str, double_quant: bool, compute_dtype: str, quant_storage: str = "uint8"
):
    """transformers' 4-bit settings; ``quant_storage`` is the packed weights' tensor dtype,
    which ``config.json`` records (``bnb_4bit_quant_storage``) for every later load."""
    import torch
    from transformers import BitsAndBytesConfig

    dtype = resolve_dtype(compute_dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=getattr(torch, quant_storage),
    )


def load_model(
    source: str,
    *,
    dtype=None,
    quantization_config=None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    complete: bool = False,
    placement: dict | None = None,
):
    """``AutoModelForCausalLM.from_pretrained`` on the right device, with a clear error.

    With ``complete``, weights files that lack a tensor of the model are refused: transformers
    would initialize it at random and load the rest without an error. ``placement``: accelerate's
    ``device_map`` (with ``max_memory``, ``offload_folder``) instead of the whole model on the
    current device (the merge check holds each model within a budget).
    """
    import torch
    from transformers import AutoModelForCausalLM

    path = sources.model_source(source)
    sources.check_model_code(source, path, trust_remote_code)
    check_weights_files(source, path, trust_remote_code)
    dtype = dtype or resolve_dtype("auto")
    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code, low_cpu_mem_usage=True)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    # The current GPU: a DDP rank's own (the train stage sets it), else the first.
    kwargs["device_map"] = (
        {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}
    )
    kwargs.update(placement or {})
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, **kwargs, output_loading_info=True)
    except OSError as exc:
        raise SourceError(f"{source}: cannot load the model ({sources.first_line(exc)})") from None
    missing = sorted(info["missing_keys"])
    if complete and missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ArtifactError(
            f"{source}: tensor {missing[0]}{more} {'are' if more else 'is'} missing from the "
            "weights files (transformers would initialize it at random); download or copy the "
            "model again"
        )
    return model


# safetensors' names of the float dtypes 16-bit weights files' float tensors may be stored in
# (transformers casts each to the dtype asked for).
FLOAT_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


def check_weights_files(source: str, path: str, trust_remote_code: bool = False) -> None:
    """Refuse 16-bit weights files whose tensors do not fit the model their config.json
    describes: a tensor of another shape, or of a non-float dtype where the model has a float
    weight. transformers loads such a file without an error: it initializes a tensor of
    another shape at random and casts integers to floats. Only the safetensors headers and
    an empty (meta-device) model are read. Quantized weights (a ``quantization_config``)
    store packed tensors of other shapes and dtypes: they are not checked, nor are names the
    model does not have (transformers renames some of them on loading).

    Raises:
        ArtifactError: naming the file, the tensor, and the expected and found shape/dtype.
    """
    import json
    from pathlib import Path

    from qlora_kfp.training import shards

    folder = Path(path)
    if not (folder / "config.json").is_file():
        return  # a hub id: from_pretrained downloads it
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return  # from_pretrained names what is wrong with it
    if not isinstance(config, dict) or config.get("quantization_config"):
        return
    found = list(shards.header_tensors(shards.weight_files(path)))
    if not found:
        return
    expected = _meta_parameters(path, trust_remote_code)
    bad = []
    for f, name, dtype, shape in found:
        want = expected.get(name)
        if want is None:
            continue
        want_shape, want_float = want
        if shape != want_shape or want_float and dtype not in FLOAT_DTYPES:
            bad.append((f, name, dtype, shape, want_shape, want_float))
    if not bad:
        return
    f, name, dtype, shape, want_shape, want_float = bad[0]
    more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
    want = [f"shape {want_shape}"] if shape != want_shape else []
    if want_float and dtype not in FLOAT_DTYPES:
        want.append("a float dtype (bfloat16, float16 or float32)")
    raise ArtifactError(
        f"{f}: tensor {name} is {_dtype_name(dtype)} of shape {shape}, but the model its "
        f"config.json describes expects {' and '.join(want)}{more}; the weights do not belong "
        f"to this config.json ({source}): download or copy the model again, with its own "
        "config.json"
    )


def _dtype_name(dtype: str) -> str:
    """torch's name of a safetensors dtype (``BF16``: bfloat16, ``I8``: int8)."""
    kinds = {"BF": "bfloat", "F": "float", "I": "int", "U": "uint"}
    bits = dtype.lstrip("BFIU")
    kind = dtype[: len(dtype) - len(bits)]
    return f"{kinds[kind]}{bits}" if kind in kinds and bits.isdigit() else dtype.lower()


def meta_model(cfg, trust_remote_code: bool = False):
    """The model ``cfg`` describes, built on the meta device (no memory: any size in
    milliseconds); None where transformers cannot build it here (the caller says what that
    leaves unchecked)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - e.g. the model's own code, not available here
        return None


def _meta_parameters(path: str, trust_remote_code: bool) -> dict[str, tuple[list[int], bool]]:
    """``name: (shape, is float)`` of each parameter and buffer of the model ``path``'s
    config.json describes, built on the meta device (no memory); ``{}`` where it cannot be
    built (``from_pretrained`` then says why)."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - from_pretrained reports it, in one line where it can
        return {}
    model = meta_model(cfg, trust_remote_code)
    if model is None:
        return {}
    tensors = {**dict(model.named_buffers()), **dict(model.named_parameters())}
    return {k: (list(t.shape), t.is_floating_point()) for k, t in tensors.items()}


def prefer_expandable_segments() -> bool:
    """Let PyTorch's CUDA allocator grow segments in place (``expandable_segments``) unless
    the environment sets the allocator up already.

    Training allocates activations of a few fixed sizes step after step; with fixed-size
    segments the cache fragments and reserves more than it allocates. The setting is read
    when CUDA starts; where something started it already (importing bitsandbytes asks for
    the GPU's compute capability), it is set on the running allocator, which applies it to
    the segments it reserves from then on, so call this before the model is loaded.

    Returns:
        Whether the allocator grows segments in place in this process.
    """
    import os

    import torch

    from qlora_kfp import env

    names = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")  # torch >= 2.9; any torch
    if not any(env.text(k) for k in names):
        for k in names:  # for this process, and the rank processes it starts
            os.environ[k] = "expandable_segments:True"
        if torch.cuda.is_initialized():
            try:
                _set_allocator_settings(torch, "expandable_segments:True")
            except RuntimeError as exc:  # a torch that takes it only at start: train anyway
                log.warning("CUDA allocator: expandable segments not set (%s)", exc)
            torch.cuda.empty_cache()  # cached fixed-size segments would be reused first
    conf = env.text(names[0]) or env.text(names[1]) or ""
    return "expandable_segments:true" in conf.replace(" ", "").lower()


def allocator_expands() -> bool | None:
    """Whether the CUDA allocator's segments grow in place, as its own snapshot says (None
    where CUDA is not in use): what a run reports, rather than what it asked for."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    try:
        segments = torch.cuda.memory_snapshot()
    except RuntimeError:  # an allocator without snapshots (backend:cudaMallocAsync)
        return None
    return any(seg.get("is_expandable") for seg in segments)


def reserved_by_stream() -> dict[str, float]:
    """GiB the CUDA allocator holds, split by where: the current (compute) stream's large and
    small pools, and every other stream's segments (a block allocated on a side stream stays
    in that stream's pool). Empty where CUDA is not in use or the allocator has no snapshot.
    The part of ``max_memory_reserved`` no step can use shows here."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    try:
        segments = torch.cuda.memory_snapshot()
    except RuntimeError:  # backend:cudaMallocAsync
        return {}
    here = torch.cuda.current_stream().cuda_stream
    out = {"large_pool": 0.0, "small_pool": 0.0, "side_streams": 0.0}
    for seg in segments:
        key = "side_streams" if seg["stream"] != here else f"{seg['segment_type']}_pool"
        out[key] = out.get(key, 0.0) + seg["total_size"] / 2**30
    return {k: round(v, 3) for k, v in out.items()}


def _set_allocator_settings(torch, settings: str) -> None:
    """The running CUDA allocator's settings (torch >= 2.9 names the call for every
    accelerator; torch.cuda's older name is deprecated there)."""
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    (setter or torch.cuda.memory._set_allocator_settings)(settings)


def decoder_layers(model) -> list:
    """transformers' checkpointable decoder layers of ``model``, in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def checkpoint_first_layers(model, n: int, offload: bool = False) -> tuple[int, int]:
    """Keep gradient checkpointing on the first ``n`` decoder layers only (``-1``: all).

    Call after ``gradient_checkpointing_enable``; calling it again changes the choice in place
    (the train stage's fallback after running out of memory). A layer left out keeps its
    activations until backward instead of recomputing its forward there: about a third less
    matrix work for that layer, for its activations' memory (``memory.kept_layer_bytes``).
    With ``offload`` the checkpointed layers keep their inputs in pinned host memory
    (:mod:`qlora_kfp.training.offload`).

    Returns:
        (layers checkpointed, layers that can be).
    """
    from qlora_kfp.training import offload as offloading

    layers = []
    for m in decoder_layers(model):
        if not hasattr(m, "_plain_checkpointing_func"):  # first call: what enable() set
            if not m.gradient_checkpointing:
                continue
            m._plain_checkpointing_func = m._gradient_checkpointing_func
        layers.append(m)
    keep = len(layers) if n < 0 else min(n, len(layers))
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i < keep
        layer._gradient_checkpointing_func = (
            offloading.checkpoint if offload else layer._plain_checkpointing_func
        )
    return keep, len(layers)


def collator(tokenizer):
    """Pads per batch; labels are padded with -100 so padding never counts in the loss."""
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(
        tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt"
    )


def take(dataset, n: int):
    """The first ``n`` rows of a dataset (all when ``n`` is 0)."""
    return dataset if not n or n >= len(dataset) else dataset.select(range(n))
