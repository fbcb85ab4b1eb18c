"""Stage 5, merge: fold the adapter into the 16-bit base model and verify the logits.

The adapter is merged into the original 16-bit weights, not the 4-bit copy: merging into
dequantized NF4 weights would bake the quantization error into the released model.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from qlora_kfp.configs import MergeConfig
from qlora_kfp.errors import VerificationError
from qlora_kfp.storage import artifacts, fingerprint, manifest, sources
from qlora_kfp.storage.manifest import atomic_folder, check_output, folder_bytes, verify
from qlora_kfp.storage.writes import output_lock
from qlora_kfp.training import merge_check, merge_shards, modeling, shards

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

    The base is merged one weights shard at a time (``merge_shards``): memory holds one output
    shard, not the model. The written model is then checked in float32: its logits on the
    probe inputs must equal those of base+adapter merged by peft and cast to ``merge_dtype``
    within ``cfg.merge_tolerance`` (``merge_max_abs_diff``); ``merge_rounding_diff`` is what
    the cast alone changes against base+adapter unmerged. Each model of the check is held
    within ``cfg.merge_memory_gib``, the rest offloaded to disk. The output folder appears
    only once the check has passed.

    Raises:
        VerificationError: when the merged logits differ by more than the tolerance.
    """
    # Refuse an output that is not ours before any long work (atomic_folder checks again).
    check_output(output_dir, "merged-model", (cfg.base_model, adapter_dir))
    # One run at a time writes it: a second is refused here, before any work.
    with output_lock(output_dir):
        return _merge(cfg, adapter_dir, output_dir)


def _merge(cfg: MergeConfig, adapter_dir: str, output_dir: str) -> MergeResult:
    from transformers import AutoTokenizer

    verify(adapter_dir, "adapter")
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    base = str(shards.local_folder(cfg.base_model))  # a hub model is then in the cache
    sources.check_model_code(cfg.base_model, base, cfg.trust_remote_code)
    modeling.check_weights_files(cfg.base_model, base, cfg.trust_remote_code)
    artifacts.check_base(
        adapter_dir,
        fingerprint.model_fingerprint(cfg.base_model),
        f"base_model={cfg.base_model}",
        "merge it into the base model it was trained on",
    )
    with atomic_folder(output_dir, "merged-model") as tmp:
        written = merge_shards.merge_to_folder(
            base, adapter_dir, tmp, cfg.merge_dtype, manifest.SHARD_SIZE
        )
        _write_config(Path(base), tmp, cfg.merge_dtype)
        tokenizer.save_pretrained(tmp)
        metrics = _check(cfg, base, adapter_dir, tmp, probe_inputs(tokenizer))
        (tmp / "merge.json").write_text(
            json.dumps({"config": asdict(cfg), **metrics, **written}, indent=1)
        )
    metrics["merged_bytes"] = folder_bytes(output_dir)
    log.info("merged %s + %s: %s", sources.model_source(cfg.base_model), adapter_dir, metrics)
    return MergeResult(str(output_dir), metrics)


def _check(cfg: MergeConfig, base: str, adapter_dir: str, tmp: Path, ids) -> dict:
    """The logit check of the written model (``merge_check``); raises when it fails."""
    # The scratch folder lives in the output's partial folder: removed with it on a failure,
    # and by the next run's cleanup of partial folders after a kill.
    scratch = tmp / ".merge-check"
    scratch.mkdir()
    try:
        before, rounded, after = merge_check.compare(
            base,
            adapter_dir,
            tmp,
            ids,
            cfg.merge_dtype,
            merge_check.max_memory(cfg.merge_memory_gib),
            scratch,
            cfg.trust_remote_code,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    diff = (after - rounded).abs().max().item()
    metrics = {
        "merge_max_abs_diff": diff,
        "merge_rounding_diff": (rounded - before).abs().max().item(),
        "merge_logit_scale": round(before.abs().max().item(), 4),
        "merge_tolerance": cfg.merge_tolerance,
    }
    if not diff <= cfg.merge_tolerance:
        raise VerificationError(
            f"merged logits differ from base+adapter (merged by peft, {cfg.merge_dtype}) by "
            f"{diff:.3g} (> merge_tolerance {cfg.merge_tolerance}); the merged model was not "
            "saved"
        )
    return metrics


def _write_config(base: Path, out: Path, dtype: str) -> None:
    """The base's config.json with the merged dtype, its generation config and, for a model
    with its own code (trust_remote_code), that code."""
    config = json.loads((base / "config.json").read_text())
    config.pop("torch_dtype", None)  # transformers 5 writes "dtype" (and reads either)
    config["dtype"] = dtype
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in ("generation_config.json", *(p.name for p in base.glob("*.py"))):
        if (base / name).is_file():
            shutil.copyfile(base / name, out / name)
