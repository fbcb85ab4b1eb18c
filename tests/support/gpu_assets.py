"""The inputs of the GPU tests (tests/training/test_gpu_training.py), built through the stages' own
writers so a CPU test (tests/training/test_gpu_assets.py) can check that ``run_train`` accepts them:
GPU tests never run in CI, and their fixture once lacked the quantize record for a whole
release before a lent GPU showed it.
"""

from __future__ import annotations

from pathlib import Path


def build(root: Path, shape: dict, seq: int, rows: int, device: str) -> tuple[str, str]:
    """A random Llama of ``shape`` quantized to NF4 and ``rows`` fixed rows of ``seq`` tokens.

    Returns:
        (quantized-model folder, prepared-dataset folder), as the quantize and prepare
        stages would leave them (``quantize.json`` and manifests included).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora_kfp.app.demo import build_tokenizer
    from qlora_kfp.storage.artifacts import write_dataset_record, write_quantize_record
    from qlora_kfp.storage.fingerprint import model_fingerprint
    from qlora_kfp.storage.manifest import atomic_folder
    from qlora_kfp.training import modeling

    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**shape)).to(dtype)
    model.save_pretrained(root / "base")
    del model
    quantized = modeling.load_model(
        str(root / "base"),
        dtype=dtype,
        quantization_config=modeling.bnb_config("nf4", True, str(dtype).split(".")[-1]),
    )
    tok = build_tokenizer(["a b c"], vocab_size=300)  # pad id 2: only padding uses it
    with atomic_folder(root / "model4", "quantized-model") as tmp:
        quantized.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_quantize_record(
            tmp, {"base_model": str(root / "base")}, model_fingerprint(str(root / "base"))
        )
    del quantized
    if device == "cuda":
        torch.cuda.empty_cache()
    g = torch.Generator().manual_seed(1)
    data = [
        torch.randint(0, shape["vocab_size"], (seq,), generator=g).tolist() for _ in range(rows)
    ]
    with atomic_folder(root / "data", "dataset") as tmp:
        for name, part in (("train", data), ("eval", data[:4])):
            n = len(part)
            table = {"input_ids": part, "labels": part, "prompt": [""] * n, "reference": [""] * n}
            pq.write_table(pa.table(table), tmp / f"{name}.parquet")
        tok.save_pretrained(tmp / "tokenizer")
        write_dataset_record(tmp, tok, {"base_model": str(root / "base")})
    return str(root / "model4"), str(root / "data")
