"""The FP8 path's Triton kernels (``fp8_kernels`` launches them). Imported only where they
run: importing this module imports Triton and, with ``TRITON_INTERPRET=1`` set before,
defines them for Triton's CPU interpreter."""

# ruff: noqa: N803 (Triton's constexpr block sizes are upper case by convention)

import triton
import triton.language as tl


@triton.jit
def _block_maxima(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, block, mask,
                  NESTED: tl.constexpr, BLOCKSIZE2: tl.constexpr):  # fmt: skip
    # bitsandbytes' block maxima: float32, or under double quantization their 8-bit codes,
    # dequantized as bitsandbytes does (code2[q] * absmax2[block // BLOCKSIZE2] + offset;
    # launched without FMA contraction: the same two roundings). 0 outside ``mask``.
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        a2 = tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=mask, other=0.0)
        a = tl.load(code2_ptr + q) * a2
        a = tl.where(mask, a + tl.load(offset_ptr), 0.0)
    else:
        a = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return a


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
def nf4_rows(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, scale_ptr,
             out_ptr, half_k, limit, BLOCKSIZE: tl.constexpr, BLOCK: tl.constexpr,
             NESTED: tl.constexpr, BLOCKSIZE2: tl.constexpr):  # fmt: skip
    # Program (row, chunk): BLOCK packed bytes of one row, two weights a byte (the first
    # in the high nibble), both in the same block of the row.
    row = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = j < half_k
    byte = tl.load(packed_ptr + row * half_k + j, mask=inside, other=0).to(tl.int32)
    # BLOCKSIZE is a compile-time power of two: a shift, not an int64 division per weight
    block = (row * half_k + j) * 2 // BLOCKSIZE
    a = _block_maxima(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, block, inside,
                      NESTED, BLOCKSIZE2)  # fmt: skip
    f = a / tl.load(scale_ptr + row)
    hi = tl.load(code_ptr + ((byte >> 4) & 15)) * f
    lo = tl.load(code_ptr + (byte & 15)) * f
    both = tl.interleave(tl.minimum(tl.maximum(hi, -limit), limit),
                         tl.minimum(tl.maximum(lo, -limit), limit))  # fmt: skip
    cols = tl.program_id(1) * 2 * BLOCK + tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + row * 2 * half_k + cols, both.to(out_ptr.dtype.element_ty),
             mask=cols < 2 * half_k)  # fmt: skip


@triton.jit
def _codes_tile(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, n, half_k,
                BLOCKSIZE: tl.constexpr, BN: tl.constexpr, BK2: tl.constexpr,
                NESTED: tl.constexpr, BLOCKSIZE2: tl.constexpr):  # fmt: skip
    # A tile of BN rows and 2*BK2 columns of the weight, dequantized in float32.
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    j = tl.program_id(1) * BK2 + tl.arange(0, BK2)
    inside = (rows[:, None] < n) & (j[None, :] < half_k)
    at = rows[:, None].to(tl.int64) * half_k + j[None, :]
    byte = tl.load(packed_ptr + at, mask=inside, other=0).to(tl.int32)
    a = _block_maxima(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, at * 2 // BLOCKSIZE,
                      inside, NESTED, BLOCKSIZE2)  # fmt: skip
    hi = tl.load(code_ptr + ((byte >> 4) & 15)) * a
    lo = tl.load(code_ptr + (byte & 15)) * a
    return tl.interleave(hi, lo), rows


@triton.jit
def nf4_col_amax(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr,
                 colmax_ptr, n, half_k, BLOCKSIZE: tl.constexpr, BN: tl.constexpr,
                 BK2: tl.constexpr, NESTED: tl.constexpr, BLOCKSIZE2: tl.constexpr):  # fmt: skip
    w, _ = _codes_tile(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, n,
                       half_k, BLOCKSIZE, BN, BK2, NESTED, BLOCKSIZE2)  # fmt: skip
    cols = tl.program_id(1) * 2 * BK2 + tl.arange(0, 2 * BK2)
    tl.atomic_max(colmax_ptr + cols, tl.max(tl.abs(w), axis=0), mask=cols < 2 * half_k)


@triton.jit
def nf4_cast_t(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, scale_ptr,
               out_ptr, n, half_k, limit, BLOCKSIZE: tl.constexpr, BN: tl.constexpr,
               BK2: tl.constexpr, NESTED: tl.constexpr, BLOCKSIZE2: tl.constexpr):  # fmt: skip
    w, rows = _codes_tile(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, n,
                          half_k, BLOCKSIZE, BN, BK2, NESTED, BLOCKSIZE2)  # fmt: skip
    cols = tl.program_id(1) * 2 * BK2 + tl.arange(0, 2 * BK2)
    s = tl.load(scale_ptr + cols, mask=cols < 2 * half_k, other=1.0)
    q = tl.minimum(tl.maximum(w / s[None, :], -limit), limit)
    at = cols[:, None].to(tl.int64) * n + rows[None, :]  # the transpose: [k, n]
    inside = (cols[:, None] < 2 * half_k) & (rows[None, :] < n)
    tl.store(out_ptr + at, tl.trans(q).to(out_ptr.dtype.element_ty), mask=inside)
