"""Stage 5, merge: fold the adapter into the 16-bit base model and verify the logits.

The adapter is merged into the original 16-bit weights, not the 4-bit copy: merging into
dequantized NF4 weights would bake the quantization error into the released model.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass

from qlora_kfp.configs import MergeConfig
from qlora_kfp.errors import VerificationError
from qlora_kfp.storage import artifacts, fingerprint, manifest, sources
from qlora_kfp.storage.manifest import atomic_folder, check_output, folder_bytes, verify
from qlora_kfp.storage.writes import output_lock
from qlora_kfp.training import modeling

log = logging.getLogger(__name__)


@dataclass
class MergeResult:
    path: str
    metrics: dict


def probe_inputs(tokenizer, n: int = 4, length: int = 24):
    """A few fixed pseudo-random token sequences to compare logits on."""
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(0, len(tokenizer), (n, length), generator=g)


def run_merge(cfg: MergeConfig, adapter_dir: str, output_dir: str) -> MergeResult:
    """Merge ``adapter_dir`` into ``cfg.base_model`` and save the result to ``output_dir``.

    The check runs in float32: logits of base+adapter (unmerged) and of the merged model on
    the same inputs must agree within ``cfg.merge_tolerance``; the largest difference is
    returned as ``merge_max_abs_diff``. Only then is the model cast to ``merge_dtype`` and saved.

    Raises:
        VerificationError: when the merged logits differ by more than the tolerance.
    """
    # Refuse an output that is not ours before any long work (atomic_folder checks again).
    check_output(output_dir, "merged-model", (cfg.base_model, adapter_dir))
    # One run at a time writes it: a second is refused here, before any work.
    with output_lock(output_dir):
        return _merge(cfg, adapter_dir, output_dir)


def _merge(cfg: MergeConfig, adapter_dir: str, output_dir: str) -> MergeResult:
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    verify(adapter_dir, "adapter")
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    base = modeling.load_model(
        cfg.base_model, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code
    )
    artifacts.check_base(  # after loading: a hub model is then in the cache
        adapter_dir,
        fingerprint.model_fingerprint(cfg.base_model),
        f"base_model={cfg.base_model}",
        "merge it into the base model it was trained on",
    )
    model = PeftModel.from_pretrained(base, adapter_dir)
    model.eval()
    ids = probe_inputs(tokenizer).to(next(model.parameters()).device)
    with torch.no_grad():
        before = model(input_ids=ids).logits.float()
        merged = model.merge_and_unload()
        after = merged(input_ids=ids).logits.float()
    diff = (before - after).abs().max().item()
    scale = before.abs().max().item()
    metrics = {
        "merge_max_abs_diff": diff,
        "merge_logit_scale": round(scale, 4),
        "merge_tolerance": cfg.merge_tolerance,
    }
    if not diff <= cfg.merge_tolerance:
        raise VerificationError(
            f"merged logits differ from base+adapter by {diff:.3g} (> merge_tolerance "
            f"{cfg.merge_tolerance}); the merged model was not saved"
        )
    merged = merged.to(getattr(torch, cfg.merge_dtype))
    with atomic_folder(output_dir, "merged-model") as tmp:
        merged.save_pretrained(tmp, safe_serialization=True, max_shard_size=manifest.SHARD_SIZE)
        tokenizer.save_pretrained(tmp)
        (tmp / "merge.json").write_text(json.dumps({"config": asdict(cfg), **metrics}, indent=1))
    metrics["merged_bytes"] = folder_bytes(output_dir)
    log.info("merged %s + %s: %s", sources.model_source(cfg.base_model), adapter_dir, metrics)
    return MergeResult(str(output_dir), metrics)
