"""A frozen 4-bit weight straight to e4m3, a scale per row, in one pass over the packed bytes.

The FP8 product (``fp8_base``) needs the base weight in e4m3 with a float32 scale per
output feature. Through bitsandbytes that is two walks and a bf16 copy: dequantize the NF4
codes to bfloat16 (reads 0.5 byte a weight, writes 2), then find each row's largest value and
cast (reads the 2 bytes twice, writes 1): 7.5 bytes of memory traffic a weight, in the
forward, the recomputed forward and the backward of every step, about 150 GB a step for
Llama-8B. Here the scale comes from the block maxima (bitsandbytes normalizes every block of
``blocksize`` weights by its largest magnitude, which the codebook's ±1 then holds exactly,
so a row's largest value is its largest block maximum times the codebook's largest
magnitude; an upper bound for any codebook) and each weight is ``code[q] * absmax / scale``
cast once: 1.5 bytes a weight, one Triton kernel on a GPU (``fp8_kernels``), no bf16 copy.

The backward multiplies by the weight's transpose, cast with a scale per input feature (a
column's largest magnitude, found over the codes): ``transposed=True``, 2 bytes a weight
(the codes read twice, e4m3 written once), again without a bf16 copy.

On a GPU (``e4m3(..., kernel=True)``) a weight's row and column scales are found on its
first use and kept (4 bytes an input and an output feature: 10.5 MB for Llama-8B), and the
double-quantized block maxima are undone inside the kernels: each call is one kernel launch
and an empty output, where the scales, bitsandbytes' dequantization of the maxima and the
column-maxima pass took a dozen small operations and one more pass over the codes.

Only what bitsandbytes' own layout guarantees is taken: blocks that do not straddle rows
(``in_features`` a multiple of the block size, :func:`fits`); for anything else the caller
dequantizes through bitsandbytes.
"""

from __future__ import annotations

import weakref
from typing import Any, NamedTuple

E4M3_MAX = 448.0
TINY = 1.2e-38 * E4M3_MAX  # float32's smallest normal, times 448: the scale stays normal


class Nested(NamedTuple):
    """Block maxima under bitsandbytes' double quantization, as it stores them: 8-bit codes,
    ``maximum = code2[codes] * absmax2[block // blocksize2] + offset``."""

    codes: Any
    absmax2: Any
    code2: Any
    offset: Any
    blocksize2: int


def from_codes(packed, absmax, code, blocksize: int, n: int, k: int, transposed: bool = False):
    """``(w8, scale)`` from bitsandbytes' packed 4-bit codes: ``W ≈ w8.float() * scale``.

    Args:
        packed: uint8, two codes a byte, the first in the high nibble (bitsandbytes' order).
        absmax: float32, one maximum a block of ``blocksize`` weights, in row-major order.
        code: the 16-value codebook (``quant_state.code``).
        blocksize: weights a block; divides ``k``.
        n, k: the weight's shape (out_features, in_features).
        transposed: ``W.T`` instead, with a scale per input feature.

    Returns:
        ``w8`` (float8_e4m3fn) and ``scale`` (float32, one per row of ``w8``): [n, k] and
        [n, 1], or with ``transposed`` [k, n] and [k, 1].
    """
    import torch

    pairs = torch.stack([packed.reshape(-1) >> 4, packed.reshape(-1) & 15], dim=-1)
    q = pairs.reshape(n, k // blocksize, blocksize).long()
    blocks = absmax.reshape(n, k // blocksize).float()
    if transposed:  # as fp8_base.cast_rows(W.T) computes it
        w = (code[q].float() * blocks.unsqueeze(-1)).reshape(n, k)
        scale = (w.abs().amax(dim=0).clamp(min=TINY) / E4M3_MAX).unsqueeze(1)
        w8 = (w.t() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        return w8.contiguous(), scale
    scale = row_scales(blocks, code)
    w = code[q].float() * (blocks / scale).unsqueeze(-1)
    return w.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).reshape(n, k), scale


def row_scales(blocks, code):
    """Each row's scale from its block maxima ``blocks`` [n, blocks a row]: the largest block
    maximum times the codebook's largest magnitude, over 448 (the kernels use it too)."""
    rows = blocks.amax(dim=1, keepdim=True) * code.abs().max()
    return rows.clamp(min=TINY) / E4M3_MAX


def absmax_of(state):
    """The block maxima in float32, undoing bitsandbytes' double quantization if any."""
    import bitsandbytes as bnb

    if not state.nested:
        return state.absmax
    return bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset


def maxima_of(state):
    """The block maxima as stored: float32, or :class:`Nested` (the kernels undo it)."""
    if not state.nested:
        return state.absmax
    s2 = state.state2
    return Nested(state.absmax, s2.absmax, s2.code, state.offset, int(s2.blocksize))


def fits(state) -> bool:
    """Whether ``state``'s layout is one :func:`from_codes` reads: 16 codes, 2-D, blocks
    that do not straddle rows."""
    shape = tuple(state.shape)
    return (
        len(shape) == 2
        and state.code is not None
        and state.code.numel() == 16
        and shape[1] % state.blocksize == 0
    )


# A frozen weight's row and column scales, found once (id(QuantState) -> {transposed: scale},
# dropped with the QuantState, which compares by value and so cannot key a weak dict): only
# the codes' cast is left to each call. The base weights are frozen (a new quantization is a
# new QuantState); the device is checked, as moving a model moves its QuantState's tensors.
_SCALES: dict[int, dict] = {}


def _kept(state) -> dict:
    kept = _SCALES.get(id(state))
    if kept is None:
        kept = _SCALES[id(state)] = {}
        weakref.finalize(state, _SCALES.pop, id(state), None)
    return kept


def e4m3(weight, state, transposed: bool = False, kernel: bool = False):
    """The 4-bit ``weight`` (a Params4bit's data), or its transpose, in e4m3 with a scale a
    row (module doc). ``kernel``: through the Triton kernels (a GPU), the scales found once a
    weight and the double quantization undone in the kernel: one kernel a call; else the
    torch reference."""
    import torch

    packed = weight if weight.dtype == torch.uint8 else weight.view(torch.uint8)
    n, k = (int(d) for d in state.shape)
    if not kernel:
        return from_codes(packed, absmax_of(state), state.code, state.blocksize, n, k, transposed)
    from qlora_kfp.training import fp8_kernels

    cast = fp8_kernels.nf4_cols_t if transposed else fp8_kernels.nf4_rows
    kept = _kept(state)
    scale = kept.get(transposed)
    if scale is not None and scale.device == packed.device:
        return cast(packed, maxima_of(state), state.code, state.blocksize, n, k, scale=scale)
    # The first call: the kernels find the scales from the float32 maxima, and they are kept.
    w8, kept[transposed] = cast(packed, absmax_of(state), state.code, state.blocksize, n, k)
    return w8, kept[transposed]
