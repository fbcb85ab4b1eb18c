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


def nf4_rows(packed, absmax, code, blocksize: int, n: int, k: int, out_dtype=None):
    """``fp8_weights.from_codes(..., transposed=False)`` in one kernel (and a few small ops
    for the row scales)."""
    import torch

    blocks = absmax.reshape(n, k // blocksize).float()
    scale = fp8_weights.row_scales(blocks, code)
    out = torch.empty(n, k, device=packed.device, dtype=out_dtype or torch.float8_e4m3fn)
    grid = (n, -(-(k // 2) // BLOCK))
    kernels()[1][grid](
        packed.reshape(-1), blocks, code.float(), scale, out, k // 2, E4M3_MAX,
        BLOCKSIZE=blocksize, BLOCK=BLOCK,
    )  # fmt: skip
    return out, scale


TILE = (64, 32)  # rows, packed bytes (64 columns) of the weight a program of the transpose


def nf4_cols_t(packed, absmax, code, blocksize: int, n: int, k: int, out_dtype=None):
    """``fp8_weights.from_codes(..., transposed=True)``: ``W.T`` [k, n] in e4m3, a scale per
    input feature; two kernels (the column maxima, then the cast and transposed write), both
    reading only the packed codes."""
    import torch

    _, _, col_amax, cast_t = kernels()
    blocks = absmax.reshape(-1).float()
    code = code.float()
    colmax = torch.zeros(k, device=packed.device, dtype=torch.float32)
    grid = (-(-n // TILE[0]), -(-(k // 2) // TILE[1]))
    args = (packed.reshape(-1), blocks, code)
    tile = {"BN": TILE[0], "BK2": TILE[1]}
    col_amax[grid](*args, colmax, n, k // 2, BLOCKSIZE=blocksize, **tile)
    scale = colmax.clamp(min=TINY) / E4M3_MAX
    out = torch.empty(k, n, device=packed.device, dtype=out_dtype or torch.float8_e4m3fn)
    cast_t[grid](*args, scale, out, n, k // 2, E4M3_MAX, BLOCKSIZE=blocksize, **tile)
    return out, scale.unsqueeze(1)
