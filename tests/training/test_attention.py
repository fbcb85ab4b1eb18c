"""Varlen attention: per-document causal attention from document boundaries, equal to sdpa's
block-diagonal mask on the tiny Llama; the CUDA kernel against the reference on a GPU."""

from __future__ import annotations

import pytest
import torch

from qlora_kfp.configs import TrainConfig
from qlora_kfp.errors import ConfigError
from qlora_kfp.training import attention, batching, modeling


@pytest.mark.parametrize(
    "positions,lengths",
    [
        pytest.param([[0, 1, 2, 0, 1]], [3, 2], id="two-docs-one-row"),
        pytest.param([[0, 1, 0], [0, 1, 2]], [2, 1, 3], id="rows-flattened-in-order"),
        pytest.param([[3, 4, 0, 1]], [2, 2], id="row-not-starting-at-zero"),
        pytest.param([[0, 1, 2, 3]], [4], id="one-doc"),
    ],
)
def test_doc_lengths_table(positions, lengths):
    assert attention.doc_lengths(torch.tensor(positions)) == lengths


def test_collator_boundaries_match_its_position_ids():
    docs = [{"input_ids": [5] * n, "labels": [5] * n} for n in (3, 2, 4)]
    b = batching.collate_packed([docs[:2], docs[2:]], pad_id=0, width=6)
    # Row 1 holds 3 + 2 tokens and a 1-token pad segment; row 2 holds 4 + a 2-token pad.
    assert b["cu_seq_lens_q"].tolist() == [0, 3, 5, 6, 10, 12]
    assert b["max_length_q"] == 4
    assert attention.doc_lengths(b["position_ids"]) == [3, 2, 1, 4, 2]


@pytest.mark.parametrize(
    "name,packing,kernel,want",
    [
        pytest.param("auto", "off", True, "sdpa", id="auto-padded-rows-sdpa"),
        pytest.param("auto", "bins", True, "varlen", id="auto-packed-with-kernel-varlen"),
        pytest.param("auto", "padding_free", False, "sdpa", id="auto-no-kernel-sdpa"),
        pytest.param("varlen", "bins", False, "varlen", id="explicit-varlen-kept"),
        pytest.param("eager", "bins", True, "eager", id="explicit-eager-kept"),
    ],
)
def test_resolve_table(monkeypatch, name, packing, kernel, want):
    monkeypatch.setattr(attention, "kernel", lambda: (lambda *a, **k: None) if kernel else None)
    assert attention.resolve(name, packing) == want


def test_resolve_for_another_machine_ignores_this_one(monkeypatch):
    # The preflight task runs on a CPU node but sizes training on the GPU image.
    monkeypatch.setattr(attention, "kernel", lambda: None)
    assert attention.resolve("auto", "bins", has_kernel=True) == "varlen"
    assert attention.resolve("auto", "off", has_kernel=True) == "sdpa"


def test_varlen_on_padded_rows_is_a_config_error():
    with pytest.raises(ConfigError, match="varlen needs packed rows"):
        TrainConfig(attn_implementation="varlen", packing="off")


def _masked_reference(q, k, v, lengths):
    """Eager attention with an explicit block-diagonal causal mask (tokens x heads x dim)."""
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    n = seg.numel()
    allowed = (seg[:, None] == seg[None, :]) & torch.ones(n, n, dtype=torch.bool).tril()
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


def test_varlen_forward_is_block_diagonal_causal_attention_with_grouped_heads():
    g = torch.Generator().manual_seed(0)
    lengths = [5, 1, 7, 3]
    n = sum(lengths)
    q = torch.randn(1, 4, n, 8, generator=g)
    k, v = (torch.randn(1, 2, n, 8, generator=g) for _ in range(2))
    cu = attention.cu_seq_lens(lengths)
    out, _ = attention.varlen_attention_forward(
        None, q, k, v, None, scaling=8**-0.5, cu_seq_lens_q=cu, max_length_q=max(lengths)
    )
    want = _masked_reference(*(x[0].transpose(0, 1) for x in (q, k, v)), lengths)
    torch.testing.assert_close(out[0], want, rtol=1e-5, atol=1e-5)


def test_shared_position_ids_mean_one_document_per_row():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(3, 2, 5, 4, generator=g) for _ in "qkv")
    out, _ = attention.varlen_attention_forward(
        None, q, k, v, None, position_ids=torch.arange(5)[None]
    )
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, want.transpose(1, 2), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def two_models(demo_assets):
    # float64: the test is about which tokens attend to which, so rounding must not be able to
    # blur it. In float32 the two paths agree to ~4e-6 here, but a CI run saw one call (of
    # four identical-in-math ones) differ by 1.2e-3 in the logits of one document. A wrong
    # boundary moves logits by ~5 (cross-document attention measured 5.6 on this model).
    attention.register()
    models = {
        name: modeling.load_model(
            demo_assets["base_model"], dtype=torch.float64, attn_implementation=name
        ).eval()
        for name in ("sdpa", "varlen")
    }
    for m in models.values():
        m.config.use_cache = False
    return models


@pytest.mark.parametrize("mode", ["padding_free", "bins"])
@pytest.mark.parametrize("boundaries", ["from-collator", "from-position-ids"])
def test_varlen_model_gives_the_sdpa_logits(two_models, prepared, mode, boundaries):
    from transformers import AutoTokenizer

    from qlora_kfp.storage.artifacts import token_rows

    rows = token_rows(prepared.path, "train")[:6]
    tok = AutoTokenizer.from_pretrained(f"{prepared.path}/tokenizer")
    features = rows if mode == "padding_free" else batching.packed_rows(rows, 64)
    batch = batching.make_collator(mode, tok, width=64 if mode == "bins" else 0)(features)
    plain = {k: batch[k] for k in ("input_ids", "labels", "position_ids")}
    with torch.no_grad():
        want = two_models["sdpa"](**plain)
        got = two_models["varlen"](**(batch if boundaries == "from-collator" else plain))
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-8, atol=1e-8)


@pytest.mark.gpu
def test_cuda_varlen_kernel_matches_the_reference_forward_and_backward():
    assert attention.kernel() is not None, "torch has no varlen attention kernel"
    g = torch.Generator(device="cuda").manual_seed(0)
    lengths = [300, 17, 1000, 731]
    n = sum(lengths)
    q = torch.randn(1, 32, n, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (
        torch.randn(1, 8, n, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in "kv"
    )
    cu = attention.cu_seq_lens(lengths).cuda()
    grads = []
    for fn in ("kernel", "reference"):
        # The reference runs in float32: the kernel's bf16 error is measured against it.
        dtype = torch.bfloat16 if fn == "kernel" else torch.float32
        xs = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        if fn == "kernel":
            out, _ = attention.varlen_attention_forward(
                None, *xs, None, cu_seq_lens_q=cu, max_length_q=max(lengths)
            )
        else:
            flat = [x[0].transpose(0, 1) for x in xs]
            out = attention._per_document(*flat, cu.cpu(), None).unsqueeze(0)
        out.float().square().sum().backward()
        grads.append([out.detach().float()] + [x.grad.float() for x in xs])
    for name, got, want in zip(("out", "dq", "dk", "dv"), *grads, strict=True):
        err = (got - want).abs().max() / want.abs().max()
        assert err < 1e-2, f"{name}: largest error {err:.2e} of the largest value"
