"""Triton kernels for the FP8 path's casts: a tensor's rows, and NF4 codes (or their
transpose), to e4m3.

Each reads its input once (the transpose's column maxima read the codes once more), where
``torch.compile`` of the same arithmetic measured 1.3-2.9x slower for the row casts and, for
the NF4 codes, 2.3x slower than bitsandbytes' dequantization plus a cast (it materialized
the int64 code indices); ``nf4_rows`` takes 0.09 ms of GPU time for a 14336x4096 weight on an
H100 (BENCHMARKS.md, session 12). They compute what the torch references compute, in the
same float32 order: ``fp8_base.cast_rows`` (``t / scale`` with ``scale = max(amax, TINY) /
448``) and ``fp8_weights.from_codes`` (``code[q] * (absmax / scale)``). The scales are equal;
the e4m3 values are equal but where Triton's fp32 division (``div.full.f32``, within 2 ulp;
torch divides exactly) puts a quotient on the other side of a rounding point, one e4m3 step
(a few values in millions; the GPU test bounds it).

The NF4 kernels take the block maxima as bitsandbytes stores them (float32, or the 8-bit
codes of double quantization, undone in the kernel as bitsandbytes undoes it: launched
without FMA contraction) and the scales where known (``fp8_weights.e4m3`` keeps a frozen
weight's); the column maxima are their own kernel (:func:`col_scales`).

The kernels (``fp8_triton``) are imported on first use: importing this module needs no
Triton, and ``TRITON_INTERPRET=1`` set before Triton is imported runs them on the CPU (the
tests do, writing float32 where a GPU writes e4m3: the interpreter's float8 conversion is
not the GPU's).
"""

from __future__ import annotations

import functools

from qlora_kfp.training import fp8_weights
from qlora_kfp.training.fp8_weights import E4M3_MAX, TINY

BLOCK = 1024  # elements a program handles at once (a row is walked in such chunks)


@functools.cache
def kernels():
    """``(row_cast, nf4_rows, nf4_col_amax, nf4_cast_t)``, the jitted kernels."""
    from qlora_kfp.training import fp8_triton as k

    return k.row_cast, k.nf4_rows, k.nf4_col_amax, k.nf4_cast_t


def row_cast(t, out_dtype=None):
    """``fp8_base.cast_rows(t)`` in one kernel; ``t`` 2-D with unit column stride."""
    import torch

    m, k = t.shape
    out = torch.empty(m, k, device=t.device, dtype=out_dtype or torch.float8_e4m3fn)
    scale = torch.empty(m, 1, device=t.device, dtype=torch.float32)
    if m:
        kernels()[0][(m,)](t, out, scale, k, t.stride(0), TINY, E4M3_MAX, BLOCK=BLOCK)
    return out, scale


def _maxima(absmax):
    """The kernels' block-maxima arguments: float32 maxima, or an ``fp8_weights.Nested``
    (bitsandbytes' double quantization, undone in the kernel)."""
    if isinstance(absmax, fp8_weights.Nested):
        args = (absmax.codes, absmax.absmax2, absmax.code2, absmax.offset)
        return args, {"NESTED": True, "BLOCKSIZE2": absmax.blocksize2}
    flat = absmax.reshape(-1).float()
    return (flat, flat, flat, flat), {"NESTED": False, "BLOCKSIZE2": 1}


# The nested maxima are a product and a sum: FMA contraction would round them once, not
# twice as bitsandbytes does (the interpreter ignores the option).
EXACT = {"enable_fp_fusion": False}


def nf4_rows(packed, absmax, code, blocksize: int, n: int, k: int, out_dtype=None, scale=None):
    """``fp8_weights.from_codes(..., transposed=False)`` in one kernel. ``scale`` [n, 1]: the
    rows' scales where known (a frozen weight's are: ``fp8_weights.e4m3`` keeps them); else
    found from ``absmax``, which must then be float32 maxima."""
    import torch

    if scale is None:
        scale = fp8_weights.row_scales(absmax.reshape(n, k // blocksize).float(), code)
    out = torch.empty(n, k, device=packed.device, dtype=out_dtype or torch.float8_e4m3fn)
    maxima, nested = _maxima(absmax)
    grid = (n, -(-(k // 2) // BLOCK))
    kernels()[1][grid](
        packed.reshape(-1), *maxima, code.float(), scale, out, k // 2, E4M3_MAX,
        BLOCKSIZE=blocksize, BLOCK=BLOCK, **nested, **EXACT,
    )  # fmt: skip
    return out, scale


TILE = (64, 32)  # rows, packed bytes (64 columns) of the weight a program of the transpose


def col_scales(packed, absmax, code, blocksize: int, n: int, k: int):
    """The scale of each input feature [k, 1]: its column's largest magnitude over 448, found
    over the codes (one kernel)."""
    import torch

    colmax = torch.zeros(k, device=packed.device, dtype=torch.float32)
    maxima, nested = _maxima(absmax)
    grid = (-(-n // TILE[0]), -(-(k // 2) // TILE[1]))
    kernels()[2][grid](
        packed.reshape(-1), *maxima, code.float(), colmax, n, k // 2, BLOCKSIZE=blocksize,
        BN=TILE[0], BK2=TILE[1], **nested, **EXACT,
    )  # fmt: skip
    return (colmax.clamp(min=TINY) / E4M3_MAX).unsqueeze(1)


def nf4_cols_t(packed, absmax, code, blocksize: int, n: int, k: int, out_dtype=None, scale=None):
    """``fp8_weights.from_codes(..., transposed=True)``: ``W.T`` [k, n] in e4m3, a scale per
    input feature (``scale`` [k, 1] where known, else :func:`col_scales`); both kernels read
    only the packed codes and the block maxima."""
    import torch

    if scale is None:
        scale = col_scales(packed, absmax, code, blocksize, n, k)
    out = torch.empty(k, n, device=packed.device, dtype=out_dtype or torch.float8_e4m3fn)
    maxima, nested = _maxima(absmax)
    grid = (-(-n // TILE[0]), -(-(k // 2) // TILE[1]))
    kernels()[3][grid](
        packed.reshape(-1), *maxima, code.float(), scale, out, n, k // 2, E4M3_MAX,
        BLOCKSIZE=blocksize, BN=TILE[0], BK2=TILE[1], **nested, **EXACT,
    )  # fmt: skip
    return out, scale
