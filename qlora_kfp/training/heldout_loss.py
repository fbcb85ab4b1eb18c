"""The loss on held-out rows (completion tokens only) within a bounded amount of memory.

The quantize stage (16-bit vs 4-bit) and the evaluate stage (base vs tuned) both score the
eval split. A forward pass returns logits of tokens x vocabulary, and a float32 cross-entropy
over all of them holds that twice more in float32: for eight 2,048-token rows of Llama 3's
128,256-word vocabulary, 4.2 GB of bf16 logits and 17 GB of float32 (measured on 70B shapes,
session 15: the evaluate stage peaked at 57 GiB on a model that trained within 44). Here each
forward takes as many rows as keep its logits within :data:`LOGITS_BYTES`, and the loss is
summed over slices of :data:`SLICE_BYTES` of float32 logits, so what scoring adds to the model
does not grow with the vocabulary times the batch. The model's own forward makes the logits
(with whatever it does to them: Gemma 2's soft cap, scaled heads).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

LOGITS_BYTES = 2**30  # the logits of one forward pass (counted as float32, the widest)
SLICE_BYTES = 2**28  # float32 logits of one cross-entropy call (its log-softmax doubles it)


def batches(rows: Iterable[dict], tokenizer, vocab: int, most_rows: int = 8) -> Iterator[dict]:
    """Padded batches of at most ``most_rows`` rows whose logits (rows x longest row x
    ``vocab``, float32 at most) stay within :data:`LOGITS_BYTES`; a row alone always makes
    a batch, however long."""
    from qlora_kfp.training.modeling import collator

    coll, buf, longest = collator(tokenizer), [], 0
    for r in rows:
        n = len(r["input_ids"])
        wider = max(longest, n)
        if buf and (len(buf) == most_rows or (len(buf) + 1) * wider * vocab * 4 > LOGITS_BYTES):
            yield coll(buf)
            buf, longest = [], 0
        buf.append({"input_ids": r["input_ids"], "labels": r["labels"]})
        longest = max(longest, n)
    if buf:
        yield coll(buf)


def summed(logits, labels) -> tuple[float, int]:
    """Cross-entropy summed over the tokens whose next token is labelled, and their count,
    computed over slices of the sequence (each at most :data:`SLICE_BYTES` in float32)."""
    import torch

    vocab = logits.shape[-1]
    step = max(1, SLICE_BYTES // (4 * vocab))
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for row, row_labels in zip(logits, labels, strict=True):
        targets = row_labels[1:]
        for s in range(0, targets.shape[0], step):
            t = targets[s : s + step]  # a slice with no label adds 0
            lg = row[s : s + t.shape[0]].float()
            ce = torch.nn.functional.cross_entropy(lg, t, ignore_index=-100, reduction="sum")
            total += ce
    # One read back from the device a batch, not one a slice.
    return float(total), int((labels[:, 1:] != -100).sum())


def measure(model, rows, tokenizer, desc: str = "eval") -> dict:
    """Token-weighted mean loss on completion tokens, its perplexity and the token count.

    Args:
        model: A causal LM (4-bit, 16-bit, or peft-wrapped).
        rows: Token rows (``input_ids``, ``labels`` with -100 where nothing is scored).
        tokenizer: Pads the batches.
        desc: The progress bar's label.
    """
    import torch
    from tqdm.auto import tqdm

    model.eval()
    dev = next(model.parameters()).device
    cfg = (
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    )
    vocab = getattr(cfg, "vocab_size", None) or len(tokenizer)
    total, count = 0.0, 0
    with torch.no_grad():
        for b in tqdm(list(batches(rows, tokenizer, vocab)), desc=desc, leave=False):
            b = {k: v.to(dev) for k, v in b.items()}
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            got, n = summed(logits, b["labels"])
            del logits
            total, count = total + got, count + n
    loss = total / max(count, 1)
    return {
        "loss": round(loss, 6),
        "perplexity": round(math.exp(min(loss, 50)), 4),
        "tokens": count,
    }
