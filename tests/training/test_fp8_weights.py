"""NF4 codes straight to e4m3: the same weights bitsandbytes' dequantization and a row cast give."""

from __future__ import annotations

import pytest
import torch

from qlora_kfp.training import fp8_base, fp8_weights

CASES = {  # name: (quant_type, blocksize, nested, dtype)
    "nf4, double quantization, bf16 (the project's setting)": ("nf4", 64, True, torch.bfloat16),
    "nf4, plain absmax, fp32": ("nf4", 64, False, torch.float32),
    "nf4, blocks of 128": ("nf4", 128, True, torch.bfloat16),
    "fp4 codebook": ("fp4", 64, True, torch.bfloat16),
}


def _quantized(quant_type, blocksize, nested, dtype, shape=(48, 256)):
    import bitsandbytes as bnb

    torch.manual_seed(0)
    w = (torch.randn(shape) * 0.02).to(dtype)
    w[3] = 0  # an all-zero row: scale floored, no NaN
    packed, state = bnb.functional.quantize_4bit(
        w, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type
    )
    return packed, state


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_codes_to_e4m3_match_dequantize_then_cast(case):
    import bitsandbytes as bnb

    packed, state = _quantized(*case)
    assert fp8_weights.fits(state)
    w8, scale = fp8_weights.e4m3(packed, state)
    ref = bnb.functional.dequantize_4bit(packed, state).float()
    ref8, ref_scale = fp8_base.cast_rows(ref)
    assert w8.dtype == torch.float8_e4m3fn and w8.shape == ref.shape and w8.is_contiguous()
    # The scale is the largest block maximum times the codebook's largest magnitude: the
    # row's largest value for NF4 (its ±1 holds each block's maximum), a bound for FP4; the
    # reference's row maxima went through the compute dtype (bf16: within 2**-8).
    rows = ref.abs().amax(dim=1) > 0
    assert (scale >= ref_scale * (1 - 2**-8))[rows].all()
    if case[0] == "nf4":
        torch.testing.assert_close(scale[rows], ref_scale[rows], rtol=2**-8, atol=0)
        # Without the bf16 copy the casts may round differently, by one e4m3 step at most.
        step = (ref8.float().abs() / 8).clamp(min=2**-9)
        assert ((w8.float() - ref8.float()).abs() <= step).all()
        assert (w8.float() != ref8.float()).float().mean() < 0.03  # measured 1.4%
    back = w8.float() * scale
    assert torch.isfinite(back).all() and (back[3] == 0).all()
    err = (back - ref).norm() / ref.norm()
    assert err < 0.05, err  # e4m3's 3 mantissa bits
    # The transpose: a scale per input feature, as a row cast of the dequantized W.T gives.
    w8t, scale_t = fp8_weights.e4m3(packed, state, transposed=True)
    ref8t, ref_scale_t = fp8_base.cast_rows(ref.t())
    assert w8t.shape == ref8t.shape and w8t.is_contiguous()
    torch.testing.assert_close(scale_t, ref_scale_t, rtol=2**-8, atol=0)
    assert (w8t.float() != ref8t.float()).float().mean() < 0.03
    assert (w8t.float() * scale_t - ref.t()).norm() / ref.norm() < 0.05


def test_blocks_that_straddle_rows_are_left_to_bitsandbytes():
    packed, state = _quantized("nf4", 64, True, torch.bfloat16, shape=(64, 96))
    assert not fp8_weights.fits(state)
