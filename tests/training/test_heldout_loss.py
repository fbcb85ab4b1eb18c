"""The held-out loss within bounded memory: the same loss as the whole batch's logits."""

from __future__ import annotations

import pytest
import torch

from qlora_kfp.storage import artifacts
from qlora_kfp.training import heldout_loss, modeling


def _reference(model, rows, tokenizer) -> float:
    """The loss as the stages computed it before: every row in one batch, all its logits
    in float32 at once."""
    coll = modeling.collator(tokenizer)
    b = coll([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    flat = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    loss = torch.nn.functional.cross_entropy(
        flat, b["labels"][:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )
    return float(loss) / int((b["labels"][:, 1:] != -100).sum())


@pytest.fixture(scope="module")
def scored(quantized, prepared):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(quantized.path)
    rows = modeling.take(artifacts.load_split(prepared.path, "eval"), 8)
    model = modeling.load_model(quantized.path, dtype=torch.float32)
    return model, rows, tok


@pytest.mark.parametrize(
    "logits_bytes, slice_bytes",
    [
        pytest.param(heldout_loss.LOGITS_BYTES, heldout_loss.SLICE_BYTES, id="defaults"),
        pytest.param(1, 1, id="a-row-a-forward-a-token-a-slice"),
        pytest.param(3 * 64 * 512 * 4, 7 * 512 * 4, id="three-rows-seven-tokens"),
    ],
)
def test_the_loss_is_the_whole_batch_s(scored, monkeypatch, logits_bytes, slice_bytes):
    model, rows, tok = scored
    monkeypatch.setattr(heldout_loss, "LOGITS_BYTES", logits_bytes)
    monkeypatch.setattr(heldout_loss, "SLICE_BYTES", slice_bytes)
    want = _reference(model, rows, tok)
    got = heldout_loss.measure(model, rows, tok)
    assert got["tokens"] == sum(sum(1 for t in r["labels"][1:] if t != -100) for r in rows)
    assert got["loss"] == pytest.approx(want, rel=1e-5)


def test_no_forward_holds_more_logits_than_the_budget(scored, monkeypatch):
    """Eight rows in one forward made the 70B evaluate stage peak 13 GiB over training; now
    a forward takes only the rows whose logits fit."""
    model, rows, tok = scored
    vocab = model.config.vocab_size
    longest = max(len(r["input_ids"]) for r in rows)
    monkeypatch.setattr(heldout_loss, "LOGITS_BYTES", 2 * longest * vocab * 4)
    seen = []
    hook = model.register_forward_hook(lambda _m, _a, out: seen.append(tuple(out.logits.shape)))
    try:
        heldout_loss.measure(model, rows, tok)
    finally:
        hook.remove()
    assert sum(s[0] for s in seen) == len(rows)
    assert all(s[0] * s[1] * vocab * 4 <= heldout_loss.LOGITS_BYTES for s in seen)
    assert max(s[0] for s in seen) == 2


@pytest.mark.parametrize(
    "lengths, budget_tokens, most, want",
    [
        pytest.param([10] * 5, 1000, 8, [5], id="all-fit"),
        pytest.param([10] * 5, 1000, 2, [2, 2, 1], id="row-cap"),
        pytest.param([10, 10, 40, 10], 60, 8, [2, 1, 1], id="a-long-row-starts-a-batch"),
        pytest.param([100, 5], 50, 8, [1, 1], id="a-row-over-the-budget-goes-alone"),
    ],
)
def test_batches_by_rows_and_logits(prepared, lengths, budget_tokens, most, want, monkeypatch):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(f"{prepared.path}/tokenizer")
    monkeypatch.setattr(heldout_loss, "LOGITS_BYTES", budget_tokens * 4)
    rows = [{"input_ids": [1] * n, "labels": [-100] + [1] * (n - 1)} for n in lengths]
    got = [b["input_ids"].shape[0] for b in heldout_loss.batches(rows, tok, 1, most_rows=most)]
    assert got == want
