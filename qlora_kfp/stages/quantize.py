"""Stage 2, quantize: load the base model in 4 bit (NF4/FP4) and save it as a checkpoint."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from qlora_kfp.configs import QuantizeConfig
from qlora_kfp.storage import sources
from qlora_kfp.storage.fingerprint import model_fingerprint
from qlora_kfp.storage.manifest import atomic_folder, check_output, folder_bytes
from qlora_kfp.training import modeling

log = logging.getLogger(__name__)


@dataclass
class QuantizeResult:
    path: str
    metrics: dict


def dequant_error(model_4bit, model_16bit) -> dict:
    """Relative Frobenius error ||W - deq(Q(W))|| / ||W|| over every 4-bit Linear."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    import torch

    ref = dict(model_16bit.named_modules())
    num = den = 0.0
    worst, layers = 0.0, 0
    for name, mod in model_4bit.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            w = ref[name].weight.detach().float()
            dq = F.dequantize_4bit(mod.weight.data, mod.weight.quant_state).float().to(w.device)
            diff = torch.linalg.norm(w - dq).item() ** 2
            num, den, layers = num + diff, den + torch.linalg.norm(w).item() ** 2, layers + 1
            worst = max(worst, (diff / max(torch.linalg.norm(w).item() ** 2, 1e-30)) ** 0.5)
    return {
        "quant_rel_error": round((num / max(den, 1e-30)) ** 0.5, 6),
        "quant_rel_error_worst_layer": round(worst, 6),
        "quant_layers": layers,
    }


def run_quantize(
    cfg: QuantizeConfig, output_dir: str, dataset_dir: str | None = None
) -> QuantizeResult:
    """Quantize ``cfg.base_model`` to 4 bit and save it (with tokenizer) under ``output_dir``.

    Args:
        cfg: The stage configuration.
        output_dir: Folder to create for the 4-bit checkpoint.
        dataset_dir: A prepared dataset; when given, the eval split's perplexity is measured
            for the 16-bit and the 4-bit model.

    Returns:
        The folder and metrics: sizes, compression ratio, dequantization error, perplexities.
    """
    # Refuse an output that is not ours before any long work (atomic_folder checks again).
    check_output(output_dir, "quantized-model", (cfg.base_model, dataset_dir or ""))
    import torch

    from qlora_kfp.stages.prepare import load_split

    evals = modeling.take(load_split(dataset_dir, "eval"), cfg.eval_rows) if dataset_dir else None
    tokenizer = sources.load_tokenizer(cfg.base_model, cfg.trust_remote_code)
    if dataset_dir:  # the tokenizer with the chat template the data was rendered with
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(Path(dataset_dir) / "tokenizer")
    qcfg = modeling.bnb_config(cfg.quant_type, cfg.double_quant, cfg.compute_dtype)
    dtype = modeling.resolve_dtype(cfg.compute_dtype)
    model16 = modeling.load_model(
        cfg.base_model, dtype=dtype, trust_remote_code=cfg.trust_remote_code
    )
    model4 = modeling.load_model(
        cfg.base_model,
        dtype=dtype,
        quantization_config=qcfg,
        trust_remote_code=cfg.trust_remote_code,
    )
    n_params = sum(p.numel() for p in model16.parameters())
    metrics = {"params": n_params, "bytes_16bit": 2 * n_params}
    metrics.update(dequant_error(model4, model16))
    if evals is not None:
        ppl16 = modeling.eval_loss(model16, evals, tokenizer, desc="16-bit eval")
        ppl4 = modeling.eval_loss(model4, evals, tokenizer, desc="4-bit eval")
        metrics.update(
            eval_loss_16bit=ppl16["loss"],
            eval_perplexity_16bit=ppl16["perplexity"],
            eval_loss_4bit=ppl4["loss"],
            eval_perplexity_4bit=ppl4["perplexity"],
        )
    del model16
    with atomic_folder(output_dir, "quantized-model") as tmp:
        model4.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        # What the adapter trained on this copy records, for merge to check its base against.
        base = {"base_model_fingerprint": model_fingerprint(cfg.base_model)}
        (tmp / "quantize.json").write_text(json.dumps({"config": asdict(cfg), **base}, indent=1))
    metrics["bytes_4bit"] = folder_bytes(output_dir)
    metrics["compression_ratio"] = round(metrics["bytes_16bit"] / metrics["bytes_4bit"], 3)
    log.info("quantized %s: %s", cfg.base_model, metrics)
    if torch.cuda.is_available():
        metrics["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return QuantizeResult(str(output_dir), metrics)
