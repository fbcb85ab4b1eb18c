"""Stage 2, quantize: load the base model in 4 bit (NF4/FP4) and save its weights."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from qlora_kfp.configs import QuantizeConfig
from qlora_kfp.errors import ArtifactError
from qlora_kfp.storage import artifacts, manifest, sources
from qlora_kfp.storage.fingerprint import model_fingerprint
from qlora_kfp.storage.manifest import atomic_folder, check_output, folder_bytes
from qlora_kfp.storage.writes import output_lock
from qlora_kfp.training import heldout_loss, modeling, shards

log = logging.getLogger(__name__)


@dataclass
class QuantizeResult:
    path: str
    metrics: dict


def _refuse_non_finite(name: str, tensor, source: str) -> None:
    """A NaN or Inf weight quantizes to NaN; its error would be NaN beside a finite worst
    layer (``max`` skips NaN), and the stage would end as if it had worked."""
    import torch

    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise ArtifactError(
            f"{source}: tensor {name} holds {bad} NaN or Inf values of {tensor.numel()} (in "
            f"{str(tensor.dtype).removeprefix('torch.')}); the base model is corrupt: download "
            "or copy it again"
        )


def check_finite(model_4bit, source: str) -> None:
    """Refuse NaN or Inf in the weights the 4-bit model keeps in 16 bit (embeddings, norms,
    head); the 4-bit ones are checked from their originals (:func:`dequant_error`)."""
    import bitsandbytes as bnb

    packed = {
        f"{name}.weight"
        for name, mod in model_4bit.named_modules()
        if isinstance(mod, bnb.nn.Linear4bit)
    }
    for name, p in model_4bit.named_parameters():
        if name not in packed:
            _refuse_non_finite(name, p.data, source)


def dequant_error(model_4bit, files, dtype, source: str = "") -> dict:
    """Relative Frobenius error ||W - deq(Q(W))|| / ||W|| over every 4-bit Linear.

    The originals ``W`` are read from the base model's weights ``files`` one at a time (in
    ``dtype``, as the 4-bit load cast them before quantizing), never as a 16-bit model.

    Raises:
        ArtifactError: an original holds NaN or Inf (named with ``source``).
    """
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    import torch

    mods = {
        f"{name}.weight": mod
        for name, mod in model_4bit.named_modules()
        if isinstance(mod, bnb.nn.Linear4bit)
    }
    total = len(mods)
    num = den = 0.0
    worst, layers = 0.0, 0
    for key, w in shards.tensors(files, set(mods)):
        mod = mods.pop(key)
        dq = F.dequantize_4bit(mod.weight.data, mod.weight.quant_state).float()
        w = w.to(dq.device).to(dtype)
        _refuse_non_finite(key, w, source or str(files[0].parent))
        w = w.float()
        diff = torch.linalg.norm(w - dq).item() ** 2
        norm = torch.linalg.norm(w).item() ** 2
        num, den, layers = num + diff, den + norm, layers + 1
        worst = max(worst, (diff / max(norm, 1e-30)) ** 0.5)
        del w, dq
    if mods:  # weights whose keys transformers renames on loading
        log.warning(
            "%d of %d 4-bit weights not found by name in the weights files", len(mods), total
        )
    return {
        "quant_rel_error": round((num / max(den, 1e-30)) ** 0.5, 6),
        "quant_rel_error_worst_layer": round(worst, 6),
        "quant_layers": layers,
    }


def room_for_16bit_bytes() -> float:
    """Memory a 16-bit reference model may take now: most of the GPU's free memory, or half
    of the host's available memory on the CPU."""
    import torch

    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return 0.8 * free
    from qlora_kfp.training import autofit

    return 0.5 * autofit.host_available_gib() * 2**30


def run_quantize(
    cfg: QuantizeConfig, output_dir: str, dataset_dir: str | None = None
) -> QuantizeResult:
    """Quantize ``cfg.base_model`` to 4 bit and save it (with tokenizer) under ``output_dir``.

    Args:
        cfg: The stage configuration.
        output_dir: Folder to create for the 4-bit model.
        dataset_dir: A prepared dataset; when given, the eval split's perplexity is measured
            for the 4-bit model, and for the 16-bit one where it fits in memory beside it.

    Returns:
        The folder and metrics: sizes, compression ratio, dequantization error, perplexities.
    """
    # Refuse an output that is not ours before any long work (atomic_folder checks again).
    check_output(output_dir, "quantized-model", (cfg.base_model, dataset_dir or ""))
    # One run at a time writes it: a second is refused here, before any work.
    with output_lock(output_dir):
        return _quantize(cfg, output_dir, dataset_dir)


def _quantize(cfg: QuantizeConfig, output_dir: str, dataset_dir: str | None) -> QuantizeResult:
    import torch

    evals = (
        modeling.take(artifacts.load_split(dataset_dir, "eval"), cfg.eval_rows)
        if dataset_dir
        else None
    )
    tokenizer = sources.load_tokenizer(cfg.base_model, cfg.trust_remote_code)
    if dataset_dir:
        artifacts.check_tokenizer(
            dataset_dir,
            tokenizer,
            f"base_model={cfg.base_model}",
            "prepare the dataset with this base_model, or quantize the model it was prepared for",
        )
    if dataset_dir:  # the tokenizer with the chat template the data was rendered with
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(Path(dataset_dir) / "tokenizer")
    qcfg = modeling.bnb_config(
        cfg.quant_type, cfg.double_quant, cfg.compute_dtype, cfg.quant_storage
    )
    dtype = modeling.resolve_dtype(cfg.compute_dtype)
    # transformers loads and quantizes shard by shard: the 16-bit model is never whole.
    model4 = modeling.load_model(
        cfg.base_model,
        dtype=dtype,
        quantization_config=qcfg,
        trust_remote_code=cfg.trust_remote_code,
        complete=True,
    )
    check_finite(model4, cfg.base_model)
    files = shards.weight_files(cfg.base_model)
    n_params = shards.tensor_numel(files)
    metrics = {"params": n_params, "bytes_16bit": 2 * n_params}
    metrics.update(dequant_error(model4, files, dtype, cfg.base_model))
    if evals is not None:
        ppl4 = heldout_loss.measure(model4, evals, tokenizer, desc="4-bit eval")
        metrics.update(eval_loss_4bit=ppl4["loss"], eval_perplexity_4bit=ppl4["perplexity"])
        # The 16-bit reference perplexity needs the whole 16-bit model: only where it fits
        # beside the 4-bit one (with room for the eval batches).
        need = 1.2 * n_params * torch.tensor([], dtype=dtype).element_size()
        if need <= room_for_16bit_bytes():
            model16 = modeling.load_model(
                cfg.base_model, dtype=dtype, trust_remote_code=cfg.trust_remote_code
            )
            ppl16 = heldout_loss.measure(model16, evals, tokenizer, desc="16-bit eval")
            metrics.update(eval_loss_16bit=ppl16["loss"], eval_perplexity_16bit=ppl16["perplexity"])
            del model16
        else:
            log.info(
                "16-bit reference perplexity skipped: the 16-bit model (%.1f GiB) does not "
                "fit beside the 4-bit one; the weight error covers every layer",
                need / 2**30,
            )
    with atomic_folder(output_dir, "quantized-model") as tmp:
        model4.save_pretrained(tmp, safe_serialization=True, max_shard_size=manifest.SHARD_SIZE)
        tokenizer.save_pretrained(tmp)
        artifacts.write_quantize_record(tmp, asdict(cfg), model_fingerprint(cfg.base_model))
    metrics["bytes_4bit"] = folder_bytes(output_dir)
    metrics["compression_ratio"] = round(metrics["bytes_16bit"] / metrics["bytes_4bit"], 3)
    log.info("quantized %s: %s", cfg.base_model, metrics)
    if torch.cuda.is_available():
        metrics["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return QuantizeResult(str(output_dir), metrics)
