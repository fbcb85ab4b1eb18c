"""Peak GPU memory of QLoRA training, estimated from the model's config alone (no weights).

Used by the preflight task, before any GPU is claimed. The parts:

* 4-bit weights: NF4 packs two weights a byte; double quantization stores one 8-bit absmax per
  64 weights plus one float32 per 256 of those (0.516 bytes a weight in all);
* 16-bit parts: embeddings and head, in float32 with ``fp32_upcast`` (what peft's
  ``prepare_model_for_kbit_training`` does), else in the compute dtype;
* LoRA: r x (in + out) per adapted Linear, float32 weights + grads + AdamW's two moments;
* activations: a checkpointed layer keeps its bf16 input, plus one layer's working set while it
  is recomputed (fitted: ``ACT_BYTES`` per token and per hidden + intermediate unit); a layer
  that is not checkpointed keeps what its backward needs (``KEPT_ACT_BYTES``, same units);
* attention mask: the boolean mask of each row for ``sdpa`` (none for ``varlen``);
* logits: float32 logits and their gradient plus a bf16 copy, unless the fused linear
  cross-entropy (Liger) computes the loss in chunks without them.

Calibrated on one measurement (Llama-3.1-8B shapes, batch 8 x 2,048, one H100, BENCHMARKS.md;
``max_memory_allocated``, so compare without the 1 GiB context): estimated 22.5 GiB vs 22.5
measured with Liger (the point the activation constant was fitted on), 42.1 vs 39.7 without
Liger (+6%). Out of sample, Llama-3.2-1B shapes on the same H100: 27.5 vs 27.0 GiB (+2%),
7.96 vs 7.36 with Liger (+8%), 13.8 vs 13.0 at batch 16 (+6%).
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30
NF4_DQ_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
ACT_BYTES = 31.0  # per token per (hidden + intermediate) unit, one recomputed layer
# Per token per unit, a layer that keeps its activations: the saved inputs of the norms, the
# 4-bit matmuls and the LoRA A matmuls (each its own dropout copy), q/k/v and attention output,
# the MLP's gate and up. Fitted: 8B shapes, 4 bins of 2,048 tokens, LoRA r=64 with dropout on
# every Linear, one H100: each layer kept adds 1.60 GiB (0, 4 and 12 of 32 layers checkpointed:
# 61.4, 54.9 and 41.7 GiB allocated, against 10.1 with all 32; BENCHMARKS.md).
KEPT_ACT_BYTES = 11.8
OVERHEAD_GIB = 1.0  # CUDA context, allocator slack


@dataclass
class MemoryEstimate:
    parts_bytes: dict[str, float]
    tokens_per_batch: int

    @property
    def parts_gib(self) -> dict[str, float]:
        return {k: round(v / GIB, 2) for k, v in self.parts_bytes.items()}

    @property
    def total_gib(self) -> float:
        return round(sum(self.parts_bytes.values()) / GIB, 2)

    def table(self) -> str:
        rows = [f"  {k:28s} {v:8.2f} GiB" for k, v in self.parts_gib.items()]
        return "\n".join([*rows, f"  {'total':28s} {self.total_gib:8.2f} GiB"])


def linear_shapes(cfg) -> list[tuple[int, int]]:
    """(in, out) of every decoder Linear: q, k, v, o, gate, up, down per layer."""
    h, inter = cfg.hidden_size, cfg.intermediate_size
    head_dim = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim
    per_layer = [(h, q), (h, kv), (h, kv), (q, h), (h, inter), (h, inter), (inter, h)]
    return per_layer * cfg.num_hidden_layers


def estimate(
    cfg,
    seq_len: int,
    batch_size: int,
    lora_r: int,
    gradient_checkpointing: bool = True,
    fused_loss: bool = True,
    packing: str = "off",
    fp32_upcast: bool = True,
    attention: str = "sdpa",
    gradient_checkpointing_layers: int = -1,
) -> MemoryEstimate:
    """Estimate peak training memory for a micro-batch of ``batch_size`` x ``seq_len`` tokens.

    ``packing="padding_free"`` lays the micro-batch out as one row of ``batch_size x seq_len``
    tokens, whose boolean attention mask grows with the square of that length;
    ``attention="varlen"`` builds no mask (it takes document boundaries instead).
    ``gradient_checkpointing_layers`` checkpoints only the first layers (-1: all), as the train
    stage does.
    """
    shapes = linear_shapes(cfg)
    h, inter, vocab, layers = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.vocab_size,
        cfg.num_hidden_layers,
    )
    tokens = seq_len * batch_size
    tied = getattr(cfg, "tie_word_embeddings", False)
    parts = {
        "4-bit weights": sum(i * o for i, o in shapes) * NF4_DQ_BYTES,
        "embeddings + head": vocab * h * (4 if fp32_upcast else 2) * (1 if tied else 2),
        "LoRA + grads + AdamW": sum(lora_r * (i + o) for i, o in shapes) * 16,
    }
    n = gradient_checkpointing_layers
    ckpt = 0 if not gradient_checkpointing else layers if n < 0 else min(n, layers)
    if ckpt:  # their inputs, and one layer's working set while it is recomputed
        parts["checkpointed activations"] = tokens * (ckpt * h * 2 + ACT_BYTES * (h + inter))
    if ckpt < layers:  # kept until backward
        parts["kept activations"] = tokens * (layers - ckpt) * KEPT_ACT_BYTES * (h + inter)
    parts["logits"] = 0 if fused_loss else tokens * vocab * 10
    rows, width = (1, tokens) if packing == "padding_free" else (batch_size, seq_len)
    parts["attention mask"] = 0 if attention == "varlen" else rows * width * width
    parts["CUDA context + slack"] = OVERHEAD_GIB * GIB
    return MemoryEstimate(parts, tokens)


def fewest_checkpointed_layers(
    cfg, seq_len: int, batch_size: int, lora_r: int, budget_gib: float, **kw
) -> int | None:
    """The fewest checkpointed layers (the fastest training) whose estimate fits ``budget_gib``:
    0 when none need checkpointing, None when not even checkpointing every layer fits."""
    kw = {**kw, "gradient_checkpointing": True}
    kw.pop("gradient_checkpointing_layers", None)
    for n in range(cfg.num_hidden_layers + 1):
        est = estimate(cfg, seq_len, batch_size, lora_r, gradient_checkpointing_layers=n, **kw)
        if est.total_gib <= budget_gib:
            return n
    return None


def largest_batch(cfg, seq_len: int, lora_r: int, budget_gib: float, **kw) -> int:
    """The largest micro-batch whose estimate fits ``budget_gib`` (0 when none does)."""
    best = 0
    for b in range(1, 513):
        if estimate(cfg, seq_len, b, lora_r, **kw).total_gib > budget_gib:
            break
        best = b
    return best
