"""Training batches without padding compute: padding-free rows and packed bins.

Three modes (``TrainConfig.packing``):

* ``off``: each micro-batch is padded to its longest row (the seeds' recipe).
* ``padding_free``: the rows of a micro-batch are laid end to end in one row; position ids
  restart at every document and transformers (``masking_utils.find_packed_sequence_indices``)
  turns them into a block-diagonal causal mask, so no document attends to another. Same batches
  and the same loss as ``off``, without computing on padding.
* ``bins``: rows are first packed into bins of at most ``pack_length`` tokens (best-fit
  decreasing; no row is split); a micro-batch is ``batch_size`` bins. Every step then carries
  about the same number of tokens, which keeps the GPU busy with short chat rows.

In every mode the first label of each document is masked (-100): in a shared row the last
token of one document must not learn to predict the first token of the next, and in a padded
row that label is never a target either, so the loss counts the same tokens in all modes.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from qlora_kfp.training.attention import cu_seq_lens

REAL_TOKENS = "num_real_tokens"  # batch key of the real-token count (``count_tokens``)


def pack_bins(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: row indices grouped into bins of at most ``capacity`` tokens.

    Args:
        lengths: Token count of each row.
        capacity: Most tokens a bin may hold; every length must fit.

    Returns:
        Bins of row indices; every row appears in exactly one bin.

    Raises:
        ValueError: a row is longer than ``capacity``.
    """
    if lengths and max(lengths) > capacity:
        raise ValueError(f"a row has {max(lengths)} tokens, more than pack_length={capacity}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    # (free space, bin index), kept sorted: the tightest bin that still fits is a bisect away.
    free: list[tuple[int, int]] = []
    for i in order:
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at == len(free):
            bins.append([i])
            bisect.insort(free, (capacity - lengths[i], len(bins) - 1))
        else:
            space, b = free.pop(at)
            bins[b].append(i)
            bisect.insort(free, (space - lengths[i], b))
    return bins


def packed_rows(rows: list[dict], capacity: int) -> list[dict]:
    """The training rows grouped into bins: ``[{"rows": [row, ...]}, ...]``."""
    bins = pack_bins([len(r["input_ids"]) for r in rows], capacity)
    # Bins come out longest-first; the Trainer shuffles them like any dataset.
    return [{"rows": [rows[i] for i in sorted(b)]} for b in bins]


def _groups(features: list[dict], flatten: bool) -> list[list[dict]]:
    """One list of documents per output row."""
    docs = [f.get("rows", [f]) for f in features]
    return [[d for group in docs for d in group]] if flatten else docs


def collate_packed(groups: list[list[dict]], pad_id: int, width: int = 0) -> dict:
    """Tensors for rows that each hold one or more documents, laid end to end.

    Position ids restart at 0 for every document; the tail padding of a short row gets its
    own run of positions, so it forms a segment of its own, and labels -100. No attention mask
    is returned: transformers builds the per-document causal mask from the position ids for
    ``sdpa``, and the ``varlen`` kernel takes the document boundaries of the flattened batch
    (``cu_seq_lens_q``/``_k``, ``max_length_q``/``_k``: see ``qlora_kfp.training.attention``).
    ``width`` pads every row to that many tokens (at least the longest row): one shape for
    every step, so kernels tuned or compiled for it (cuDNN attention, flex attention) are
    reused instead of rebuilt for each new width.
    """
    import torch

    width = max(width, *(sum(len(d["input_ids"]) for d in g) for g in groups))
    ids = torch.full((len(groups), width), pad_id, dtype=torch.long)
    labels = torch.full((len(groups), width), -100, dtype=torch.long)
    pos = torch.zeros((len(groups), width), dtype=torch.long)
    lengths: list[int] = []
    for r, group in enumerate(groups):
        at = 0
        for doc in group:
            n = len(doc["input_ids"])
            ids[r, at : at + n] = torch.tensor(doc["input_ids"])
            labels[r, at + 1 : at + n] = torch.tensor(doc["labels"][1:])
            pos[r, at : at + n] = torch.arange(n)
            lengths.append(n)
            at += n
        pos[r, at:] = torch.arange(width - at)
        if width > at:
            lengths.append(width - at)
    cu = cu_seq_lens(lengths)
    return {
        "input_ids": ids,
        "labels": labels,
        "position_ids": pos,
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": max(lengths),
        "max_length_k": max(lengths),
    }


def make_collator(mode: str, tokenizer, width: int = 0, count_tokens: bool = False):
    """The data collator for ``mode``.

    ``width``: with ``bins``, pad every bin to this many tokens (the bin capacity).
    ``count_tokens``: put the batch's count of real (non-padding) tokens under
    ``REAL_TOKENS``, so it travels with the batch to the step that trains on it (the data
    loader collates a batch ahead of training); the trainer removes it before the model.
    """
    from qlora_kfp.training import modeling

    padded = modeling.collator(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def collate(features: list[dict]) -> dict:
        if mode == "off":
            batch = padded(features)
            real = int(batch["attention_mask"].sum())
        else:
            groups = _groups(features, flatten=mode == "padding_free")
            packed_bins = mode == "bins" and any("rows" in f for f in features)
            batch = collate_packed(groups, pad_id, width if packed_bins else 0)
            real = sum(len(d["input_ids"]) for g in groups for d in g)
        if count_tokens:
            batch[REAL_TOKENS] = real
        return batch

    return collate
