"""Cases for ``test_fp8_kernels.py``: run only by its own pytest under Triton's interpreter
(``TRITON_INTERPRET=1`` before Triton is imported), so not named ``test_*.py``."""

from __future__ import annotations

import os

import pytest
import torch

from qlora_kfp.training import fp8_base, fp8_kernels, fp8_weights

E4M3 = torch.float8_e4m3fn


@pytest.fixture
def interpreted():
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through test_fp8_kernels.py"


def _wide():
    return torch.randn(3, 2 * 1500)[:, ::2]  # a view: rows 3,000 values apart


ROWS = {
    "ordinary rows": lambda: torch.randn(5, 96),
    "rows longer than a program's block": lambda: torch.randn(3, 2500),
    "a zero row gets no NaN": lambda: torch.cat([torch.zeros(1, 64), torch.randn(2, 64)]),
    "huge values stay finite": lambda: torch.randn(2, 64) * 1e30,
    "tiny values keep their size": lambda: torch.randn(2, 64) * 1e-30,
    "bf16 rows": lambda: torch.randn(4, 128).bfloat16(),
    "no rows": lambda: torch.randn(0, 64),
}


@pytest.mark.parametrize("make", ROWS.values(), ids=ROWS.keys())
def test_row_cast_is_cast_rows(make, interpreted):
    t = make()
    got, scale = fp8_kernels.row_cast(t, out_dtype=torch.float32)
    want, want_scale = fp8_base.cast_rows(t)
    assert torch.equal(scale, want_scale)
    assert torch.equal(got.to(E4M3).float(), want.float())


def test_row_cast_reads_rows_by_their_stride(interpreted):
    """A slice of wider rows (as ``reshape`` may hand over): only unit column stride needed."""
    t = torch.randn(3, 3000)[:, :1200]
    got, scale = fp8_kernels.row_cast(t, out_dtype=torch.float32)
    want, want_scale = fp8_base.cast_rows(t)
    assert torch.equal(scale, want_scale) and torch.equal(got.to(E4M3).float(), want.float())


@pytest.mark.parametrize(
    "shape,blocksize,nested",
    [((48, 256), 64, True), ((16, 4096), 64, False), ((100, 384), 128, True)],
    ids=["double quantization", "rows of many program blocks", "blocks of 128, ragged tiles"],
)
def test_nf4_rows_is_from_codes(shape, blocksize, nested, interpreted):
    import bitsandbytes as bnb

    torch.manual_seed(0)
    w = (torch.randn(shape) * 0.02).bfloat16()
    w[1] = 0
    packed, state = bnb.functional.quantize_4bit(
        w, blocksize=blocksize, compress_statistics=nested, quant_type="nf4"
    )
    n, k = shape
    absmax = fp8_weights.absmax_of(state)
    args = (packed, absmax, state.code, blocksize, n, k)
    # As bitsandbytes stores them: under double quantization 8-bit codes the kernels undo.
    stored = (packed, fp8_weights.maxima_of(state), state.code, blocksize, n, k)
    for transposed in (False, True):
        kernel = fp8_kernels.nf4_cols_t if transposed else fp8_kernels.nf4_rows
        got, scale = kernel(*args, out_dtype=torch.float32)
        want, want_scale = fp8_weights.from_codes(*args, transposed=transposed)
        assert got.shape == ((k, n) if transposed else (n, k))
        assert torch.equal(scale, want_scale)
        assert torch.equal(got.to(E4M3).float(), want.float())
        got, _ = kernel(*stored, out_dtype=torch.float32, scale=want_scale)
        assert torch.equal(got.to(E4M3).float(), want.float())
        if transposed:
            assert torch.equal(fp8_kernels.col_scales(*stored), want_scale)


def test_a_weight_s_scales_are_found_once(interpreted, monkeypatch):
    """``fp8_weights.e4m3(kernel=True)``: the reference's values; the column maxima (a kernel
    pass over the codes) and row scales found on the first call only."""
    import functools

    import bitsandbytes as bnb

    torch.manual_seed(0)
    w = (torch.randn(64, 1024) * 0.02).bfloat16()  # 1,024 blocks: 4 groups of nested maxima
    packed, state = bnb.functional.quantize_4bit(w, compress_statistics=True, quant_type="nf4")
    passes = []
    col_scales = fp8_kernels.col_scales
    monkeypatch.setattr(fp8_kernels, "col_scales", lambda *a: passes.append(1) or col_scales(*a))
    for name in ("nf4_rows", "nf4_cols_t"):  # float32 out: the interpreter's e4m3 is not a GPU's
        f = getattr(fp8_kernels, name)
        monkeypatch.setattr(fp8_kernels, name, functools.partial(f, out_dtype=torch.float32))
    for transposed in (False, True):
        want, want_scale = fp8_weights.e4m3(packed, state, transposed)
        kept = set()
        for _ in range(3):
            got, scale = fp8_weights.e4m3(packed, state, transposed, kernel=True)
            assert torch.equal(scale, want_scale)
            assert torch.equal(got.to(E4M3).float(), want.float())
            kept.add(id(scale))
        assert len(kept) == 1  # the same scale tensor each call: found once
    assert passes == [1]
    kept = id(state)
    del state
    assert kept not in fp8_weights._SCALES  # they go with the weight's quantization state
