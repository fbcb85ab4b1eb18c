"""Peak GPU memory of QLoRA training, estimated from the model's config alone (no weights).

Used by the preflight task, before any GPU is claimed, and by the train stage's ``auto``
settings. The parts:

* 4-bit weights: NF4 packs two weights a byte; double quantization stores one 8-bit absmax per
  64 weights plus one float32 per 256 of those (0.516 bytes a weight in all);
* 16-bit parts: embeddings and head, in float32 with ``fp32_upcast`` (what peft's
  ``prepare_model_for_kbit_training`` does), else in the compute dtype;
* LoRA: r x (in + out) per adapted Linear, float32 weights and grads, and AdamW's two float32
  moments (a paged optimizer keeps them in unified memory, which occupies the GPU the same
  way but is not counted by ``torch.cuda.max_memory_allocated``: the tests subtract it);
* activations, from what autograd keeps of a decoder layer for backward
  (:func:`kept_layer_bytes`): a layer that is not checkpointed keeps all of it until its
  backward; a checkpointed layer keeps its input (in host memory with ``offload``) and, while
  it is recomputed, its kept activations again plus the backward's temporaries;
* attention mask: the boolean mask of each row for ``sdpa`` (none for ``varlen``);
* logits: float32 logits and their gradient plus a bf16 copy, unless the fused linear
  cross-entropy (Liger) computes the loss in chunks without them;
* with several processes (DDP, one per GPU): every figure above is per GPU at the per-GPU
  micro-batch, as on one GPU (each holds the whole 4-bit model, its own LoRA copy, optimizer
  state and activations), plus DDP's gradient buckets: a float32 copy of the LoRA gradients
  that the all-reduce works on (``gradient_as_bucket_view`` is off in the Trainer's DDP);
* with FSDP (``sharded``): the packed 4-bit weights and the LoRA weights, gradients and AdamW
  state are split over the processes; the quantization constants stay whole on each GPU
  (bitsandbytes keeps them on the module, not in the sharded parameter); two decoder layers
  are gathered whole at a time (the one running and the next, prefetched); embeddings and
  head stay gathered from the forward to the backward (FSDP does not reshard the root
  module after its forward), beside their shard. Activations are as under DDP.

Fitted on one H100 (8B shapes, 4 bins of 2,048 tokens, varlen + Liger, LoRA r=64 on every
Linear with peft's dropout; 0, 4, 12 and 32 of 32 layers checkpointed; BENCHMARKS.md) and
checked against every setting benchmarked since (``tests/training/test_memory.py`` holds the points):
the estimate must stay within 10% of ``max_memory_allocated`` and never below it (within 4% for
the train stage as it is now: 1.4-3.2% over every peak measured with it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GIB = 2**30
NF4_DQ_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
# Measured kept activations over the element count of :func:`kept_layer_bytes`: 1.716 GiB a
# layer at 8,192 tokens on 8B shapes (224.9 KB a token) against 206 KB counted (the rest:
# softmax statistics, RoPE tables, the rank-sized LoRA outputs, allocator rounding).
KEPT_FIT = 1.10
# A checkpointed layer's recompute + backward peak over its kept activations (measured 0.90
# at 4 bins, 1.05 at 8 bins with peft's dropout, 1.18 at 8 bins without dropout); without
# checkpointing the backward's temporaries (0.45).
RECOMPUTE_WORK = {"peft": 1.10, "none": 1.25, "regenerated": 1.25}
BACKWARD_WORK = 0.50
# Regenerated LoRA dropout (``lora_dropout``): its backward holds the widest Linear input's
# dropped-out copy (2 B) and mask (1 B) for a moment, mostly beneath the backward's own peak
# elsewhere: dropout 0.1 added 0.13 GiB at 8 bins on 8B, every layer checkpointed (session
# 15: 11.442 against 11.315 GiB; 0.0 in session 14), where 3 B counted 0.66.
REGENERATED_DROPOUT_BYTES = 1
OFFLOAD_IN_FLIGHT = 2  # layer inputs on the GPU at once with offload (one copying, one used)
OVERHEAD_GIB = 1.0  # CUDA context, allocator slack
PACKED_BYTES = 0.5  # of NF4_DQ_BYTES, what FSDP shards: the packed weights, two a byte
GATHERED_LAYERS = 2  # FSDP: the decoder layer running and the next one, being gathered


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


def _dims(cfg) -> tuple[int, int, int, int]:
    h = cfg.hidden_size
    head_dim = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    return h, cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim, head_dim


def linear_shapes(cfg) -> list[tuple[int, int]]:
    """(in, out) of every decoder Linear: q, k, v, o, gate, up, down per layer."""
    h, q, kv, _ = _dims(cfg)
    inter = cfg.intermediate_size
    per_layer = [(h, q), (h, kv), (h, kv), (q, h), (h, inter), (h, inter), (inter, h)]
    return per_layer * cfg.num_hidden_layers


DROPOUT_MODES = ("none", "regenerated", "peft")


def kept_layer_bytes(
    cfg, dropout: str = "none", fp32_upcast: bool = False, recomputed: tuple[str, ...] = ()
) -> float:
    """Bytes a token that autograd keeps of one Llama-style decoder layer for its backward.

    In the compute dtype (2 bytes): the layer input and the attention block's midpoint (the
    norms' inputs), both norms' outputs (the LoRA A inputs; the 4-bit matmuls keep nothing),
    q, k and v (attention), the attention output (attention and o's LoRA), gate and up (the
    SwiGLU) and its product (down's LoRA). With ``dropout="peft"`` (peft's dropout module)
    each adapted Linear keeps its dropped-out input (2 bytes) and mask (1 byte) instead of
    sharing the plain input; the train stage's LoRA path (``"regenerated"``) draws the masks
    again in backward and keeps what ``"none"`` keeps (``lora_dropout``). With ``fp32_upcast``
    the residual stream and the norms run in float32. ``recomputed``: the LoRA A inputs made
    again in their backward from what the SwiGLU (``"swiglu"``: down's input) and the norms
    (``"norms"``: q, k, v's, gate's and up's) keep (:mod:`qlora_kfp.training.lora_inputs`).
    """
    h, q, kv, _ = _dims(cfg)
    inter = cfg.intermediate_size
    stream = 2 * h * (4 if fp32_upcast else 2)  # layer input + midpoint
    # The norms' outputs feed five Linears (q, k, v; gate, up). Under fp32_upcast they are
    # float32 and each matmul keeps its own compute-dtype cast too (autocast caches no
    # activations). o takes the attention output, down the SwiGLU product.
    if dropout == "peft":  # each Linear keeps its dropped-out input (2 B) and its mask (1 B)
        lora_inputs = 5 * h * (7 if fp32_upcast else 3) + (q + inter) * 3
    else:  # shared inputs: the norms' outputs once, the attention output with attention
        lora_inputs = (2 * h * 4 + 5 * h * 2 if fp32_upcast else 2 * h * 2) + inter * 2
    attention = (2 * q + 2 * kv) * 2  # q, k, v and the output
    mlp = 2 * inter * 2  # gate, up
    kept = (stream + lora_inputs + attention + mlp) * KEPT_FIT
    if dropout != "peft":
        # Exactly those tensors are no longer kept (measured on the H100: 64.21 -> 47.91 GiB
        # at 6 bins, 44.5 KB a token a layer); KEPT_FIT's share is of other things. o's input
        # is the attention output, kept by attention.
        kept -= inter * 2 * ("swiglu" in recomputed)
        kept -= (lora_inputs - inter * 2) * ("norms" in recomputed)
    return kept


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
    offload: bool = False,
    dropout: str = "none",
    world_size: int = 1,
    sharded: bool = False,
    recomputed: tuple[str, ...] = (),
) -> MemoryEstimate:
    """Estimate peak training memory for a micro-batch of ``batch_size`` x ``seq_len`` tokens.

    ``packing="padding_free"`` lays the micro-batch out as one row of ``batch_size x seq_len``
    tokens, whose boolean attention mask grows with the square of that length;
    ``attention="varlen"`` builds no mask (it takes document boundaries instead).
    ``gradient_checkpointing_layers`` checkpoints only the first layers (-1: all), as the train
    stage does; ``offload`` keeps their inputs in host memory. ``dropout``: LoRA dropout off
    (``none``), with masks drawn again in backward (``regenerated``, the train stage) or
    through peft's own module (``peft``; see :func:`kept_layer_bytes`). ``world_size``:
    training processes; the estimate is one GPU's, at ``batch_size`` per GPU, under DDP, or
    under FSDP with ``sharded`` (weights, LoRA and optimizer state split ``world_size`` ways).
    ``recomputed``: the LoRA A products' inputs are made again in backward (see
    :func:`kept_layer_bytes`); the backward's temporaries stay as without it, plus the
    widest input made again.
    """
    shapes = linear_shapes(cfg)
    h, vocab, layers = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    tokens = seq_len * batch_size
    tied = getattr(cfg, "tie_word_embeddings", False)
    lora = sum(lora_r * (i + o) for i, o in shapes)
    weights = sum(i * o for i, o in shapes)
    embeddings = vocab * h * (4 if fp32_upcast else 2) * (1 if tied else 2)
    if sharded and world_size > 1:
        parts = _sharded_parts(shapes, layers, weights, embeddings, lora, lora_r, world_size)
    else:
        parts = {
            "4-bit weights": weights * NF4_DQ_BYTES,
            "embeddings + head": embeddings,
            "LoRA weights + grads": lora * 8,
            "AdamW state": lora * 8,
        }
    if world_size > 1 and not sharded:
        parts["DDP gradient buckets"] = lora * 4
    n = gradient_checkpointing_layers
    ckpt = 0 if not gradient_checkpointing else layers if n < 0 else min(n, layers)
    kept = tokens * kept_layer_bytes(cfg, dropout, fp32_upcast, recomputed)
    # The backward's temporaries (the fits below, as shares of what a layer keeps without
    # ``recomputed``) do not shrink with what the layer keeps.
    scale = tokens * kept_layer_bytes(cfg, dropout, fp32_upcast)
    stream = tokens * h * (4 if fp32_upcast else 2)
    if ckpt:
        on_gpu = min(ckpt, OFFLOAD_IN_FLIGHT) if offload else ckpt
        parts["checkpointed layer inputs"] = on_gpu * stream
    if ckpt < layers:  # kept until backward
        parts["kept activations"] = (layers - ckpt) * kept
    # The backward runs from the last layer, so the layers not checkpointed (the last ones)
    # go first, each while every kept activation is held, plus its backward's temporaries;
    # they are freed by the time a checkpointed layer is recomputed. Counting the recompute
    # on top of every kept activation put the estimate 4-8% over the measured peak there.
    recompute = kept + scale * (RECOMPUTE_WORK[dropout] - 1)  # its kept + temporaries
    work = recompute if ckpt == layers else scale * BACKWARD_WORK
    if 0 < ckpt < layers:  # whichever peak is higher (the first, for every fit so far)
        work = max(work, recompute - parts["kept activations"])
    if dropout == "regenerated":
        work += tokens * max(h, cfg.intermediate_size) * REGENERATED_DROPOUT_BYTES
    if recomputed:  # the widest input made again, for a moment
        work += tokens * max(h, cfg.intermediate_size) * 2
    parts["backward working set"] = work
    if fused_loss:  # Liger: the input's gradient (kept from the forward) and two chunks
        chunk = 2 ** math.ceil(math.log2(max(1, math.ceil(tokens / math.ceil(vocab / h)))))
        parts["fused loss"] = tokens * h * 4 + 2 * chunk * vocab * 4
    else:
        parts["logits"] = tokens * vocab * 10
    rows, width = (1, tokens) if packing == "padding_free" else (batch_size, seq_len)
    parts["attention mask"] = 0 if attention == "varlen" else rows * width * width
    parts["CUDA context + slack"] = OVERHEAD_GIB * GIB
    return MemoryEstimate(parts, tokens)


def _sharded_parts(shapes, layers, weights, embeddings, lora, lora_r, world) -> dict:
    """The weights' and optimizer's parts of one GPU's memory under FSDP (see the module)."""
    per_layer = shapes[: len(shapes) // layers]
    layer = sum(i * o * PACKED_BYTES + lora_r * (i + o) * 4 for i, o in per_layer)
    return {
        "4-bit weights (shard)": weights * PACKED_BYTES / world,
        "4-bit quantization constants": weights * (NF4_DQ_BYTES - PACKED_BYTES),
        "gathered decoder layers": GATHERED_LAYERS * layer,
        "embeddings + head": embeddings * (1 + 1 / world),
        "LoRA weights + grads (shard)": lora * 8 / world,
        "AdamW state (shard)": lora * 8 / world,
    }


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
