"""Triton kernels for the FP8 path's casts: a tensor's rows, and NF4 codes, to e4m3.

Both are single passes over memory, where ``torch.compile`` of the same arithmetic measured
2.5x (row casts) and 20x (NF4 codes: it materialized the int64 code indices) above what the
bytes moved need on an H100 (BENCHMARKS.md, session 12). They compute exactly what the
torch references compute, in the same float32 order: ``fp8_base.cast_rows`` (``t / scale``
with ``scale = max(amax, TINY) / 448``) and ``fp8_weights.from_codes`` (``code[q] *
(absmax / scale)``), so the GPU tests compare them for equality.

The kernels are defined on first use: importing this module needs no Triton, and setting
``TRITON_INTERPRET=1`` before the first use runs them on the CPU (the tests do, writing
float32 where a GPU writes e4m3: the interpreter's float8 conversion is not the GPU's).
"""

from __future__ import annotations

import functools

from qlora_kfp.training.fp8_weights import E4M3_MAX, TINY

BLOCK = 1024  # elements a program handles at once (a row is walked in such chunks)


@functools.cache
def kernels():
    """``(row_cast, nf4_rows)``, the jitted kernels."""
    import triton
    import triton.language as tl

    @triton.jit
    def row_cast(x_ptr, out_ptr, scale_ptr, k, stride, tiny, limit, BLOCK: tl.constexpr):
        # One row a program: its largest magnitude, then every value over its scale.
        row = tl.program_id(0).to(tl.int64)
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, k, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            v = tl.load(x_ptr + row * stride + cols, mask=cols < k, other=0.0)
            amax = tl.maximum(amax, tl.abs(v.to(tl.float32)))
        scale = tl.maximum(tl.max(amax, axis=0), tiny) / limit
        tl.store(scale_ptr + row, scale)
        for start in range(0, k, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            v = tl.load(x_ptr + row * stride + cols, mask=cols < k, other=0.0)
            q = tl.minimum(tl.maximum(v.to(tl.float32) / scale, -limit), limit)
            tl.store(out_ptr + row * k + cols, q.to(out_ptr.dtype.element_ty), mask=cols < k)

    @triton.jit
    def nf4_rows(packed_ptr, absmax_ptr, code_ptr, scale_ptr, out_ptr, half_k, blocksize,
                 limit, BLOCK: tl.constexpr):  # fmt: skip
        # Program (row, chunk): BLOCK packed bytes of one row, two weights a byte (the first
        # in the high nibble), both in the same block of the row.
        row = tl.program_id(0).to(tl.int64)
        j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = j < half_k
        byte = tl.load(packed_ptr + row * half_k + j, mask=inside, other=0).to(tl.int32)
        block = (row * half_k + j) * 2 // blocksize
        f = tl.load(absmax_ptr + block, mask=inside, other=0.0) / tl.load(scale_ptr + row)
        hi = tl.load(code_ptr + ((byte >> 4) & 15)) * f
        lo = tl.load(code_ptr + (byte & 15)) * f
        both = tl.interleave(tl.minimum(tl.maximum(hi, -limit), limit),
                             tl.minimum(tl.maximum(lo, -limit), limit))  # fmt: skip
        cols = tl.program_id(1) * 2 * BLOCK + tl.arange(0, 2 * BLOCK)
        tl.store(out_ptr + row * 2 * half_k + cols, both.to(out_ptr.dtype.element_ty),
                 mask=cols < 2 * half_k)  # fmt: skip

    return row_cast, nf4_rows


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
    rows = blocks.amax(dim=1, keepdim=True) * code.abs().max()
    scale = rows.clamp(min=TINY) / E4M3_MAX
    out = torch.empty(n, k, device=packed.device, dtype=out_dtype or torch.float8_e4m3fn)
    grid = (n, -(-(k // 2) // BLOCK))
    kernels()[1][grid](
        packed.reshape(-1), blocks, code.float(), scale, out, k // 2, blocksize, E4M3_MAX,
        BLOCK=BLOCK,
    )  # fmt: skip
    return out, scale
