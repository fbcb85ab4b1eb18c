"""A 4-bit (NF4, double-quantized) checkpoint of random weights, built layer by layer.

A 16-bit Llama-3.1-70B checkpoint is 141 GB: more than the lent GPU machine's disk (64 GiB).
This writes the quantized-model artifact the quantize stage would have written for it,
without any 16-bit checkpoint: each decoder layer's weights are drawn on the GPU (normal,
std 0.02, as ``LlamaForCausalLM`` initializes them), quantized there by bitsandbytes
(``quantize_4bit``, what ``Params4bit`` does when transformers loads a model in 4 bit) and
saved in transformers' serialization of bitsandbytes weights (the packed weight plus its
``quant_state.as_dict(packed=True)``); embeddings, norms and head stay in bfloat16. At most
one layer is in 16 bit at a time, on the GPU.

Usage (GPU machine): python bench/build_4bit.py --size 70b --out /tmp/bench70/model4
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def quantized_tensors(name: str, weight) -> dict:
    """``name`` -> packed NF4 weight, plus its quantization state, as transformers saves them."""
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(
        weight, blocksize=64, compress_statistics=True, quant_type="nf4"
    )
    out = {name: packed}
    for key, value in state.as_dict(packed=True).items():
        out[f"{name}.{key}"] = value
    return out


def random_source(device, seed: int = 0, std: float = 0.02):
    """``source(name, shape)``: normal(0, ``std``) weights in bfloat16 on ``device`` (ones for
    norms), from one seeded generator in the order asked."""
    import torch

    gen = torch.Generator(device).manual_seed(seed)

    def source(name: str, shape: tuple[int, ...]):
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=torch.bfloat16, device=device)
        w = torch.empty(shape, dtype=torch.bfloat16, device=device)
        return w.normal_(0, std, generator=gen)

    return source


def linear_shapes(cfg) -> dict[str, tuple[int, int]]:
    """(out, in) of each decoder Linear, by its name in a layer."""
    h, inter = cfg.hidden_size, cfg.intermediate_size
    head = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * head, cfg.num_key_value_heads * head
    shapes = [(q, h), (kv, h), (kv, h), (h, q), (inter, h), (inter, h), (h, inter)]
    return dict(zip(LINEARS, shapes, strict=True))


def layer_tensors(cfg, i: int, source) -> dict:
    """Layer ``i``'s state dict: its Linears in 4 bit, its norms as they come (CPU tensors)."""
    prefix = f"model.layers.{i}."
    out = {}
    for name, shape in linear_shapes(cfg).items():
        w = source(prefix + name + ".weight", shape)
        out.update(quantized_tensors(prefix + name + ".weight", w))
        del w  # one 16-bit weight at a time
    for norm in ("input_layernorm", "post_attention_layernorm"):
        out[prefix + norm + ".weight"] = source(prefix + norm + ".weight", (cfg.hidden_size,))
    return {k: v.to("cpu") for k, v in out.items()}


def build(cfg, folder: Path, source, layers_per_shard: int = 4) -> dict:
    """Write ``config.json`` (with its quantization config) and sharded safetensors of a
    4-bit model of ``cfg``'s shape into ``folder``, its weights drawn from ``source``.

    Returns:
        Timings and sizes.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import BitsAndBytesConfig

    t0 = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    h, vocab = cfg.hidden_size, cfg.vocab_size
    parts: list[dict[str, int]] = []  # per shard: tensor name -> bytes (the tensors are gone)

    def flush(shard: dict) -> None:
        shard = {k: v.to("cpu") for k, v in shard.items()}
        parts.append({k: v.numel() * v.element_size() for k, v in shard.items()})
        save_file(shard, str(folder / f"part-{len(parts)}"), metadata={"format": "pt"})

    shard: dict = {"model.embed_tokens.weight": source("model.embed_tokens.weight", (vocab, h))}
    for i in range(cfg.num_hidden_layers):
        shard.update(layer_tensors(cfg, i, source))
        if (i + 1) % layers_per_shard == 0:
            flush(shard)
            shard = {}
    shard["model.norm.weight"] = source("model.norm.weight", (h,))
    if not getattr(cfg, "tie_word_embeddings", False):
        shard["lm_head.weight"] = source("lm_head.weight", (vocab, h))
    flush(shard)
    del shard
    # Shard names in transformers' convention; the index maps every tensor to its shard.
    n, weight_map = len(parts), {}
    for idx, sizes in enumerate(parts, 1):
        name = f"model-{idx:05d}-of-{n:05d}.safetensors"
        (folder / f"part-{idx}").rename(folder / name)
        weight_map.update(dict.fromkeys(sizes, name))
    total = sum(sum(sizes.values()) for sizes in parts)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    qcfg = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    cfg.quantization_config = qcfg.to_dict()
    cfg.dtype = "bfloat16"
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(folder)
    return {"build_s": round(time.perf_counter() - t0, 1), "bytes": total, "shards": n}


def build_artifact(cfg, out: Path, seed: int = 0) -> dict:
    """:func:`build` into a quantized-model artifact (manifest last, tokenizer beside it)."""
    import torch

    from qlora_kfp.app.demo import build_tokenizer
    from qlora_kfp.storage.artifacts import write_quantize_record
    from qlora_kfp.storage.manifest import atomic_folder

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with atomic_folder(out, "quantized-model") as tmp:
        info = build(cfg, tmp, random_source(device, seed))
        # Only padding uses the tokenizer: pad id 2 exists in every vocabulary here.
        build_tokenizer(["a b c"], vocab_size=300).save_pretrained(tmp)
        # The train stage reads what the model was made from: no checkpoint, random weights.
        write_quantize_record(tmp, {"base_model": f"random-weights:seed={seed}"}, f"random:{seed}")
    return info


def main() -> None:
    from train_bench import SIZE_70B
    from transformers import LlamaConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="70b", choices=["70b"])
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    cfg = LlamaConfig(max_position_embeddings=8192, rope_theta=500000.0, **SIZE_70B)
    print(json.dumps(build_artifact(cfg, Path(a.out), a.seed)))


if __name__ == "__main__":
    main()
