"""FP8 products for the frozen 4-bit base weights; the adapter stays in 16/32 bits.

bitsandbytes runs a 4-bit Linear as "dequantize the NF4 weight to bf16, then a bf16 GEMM",
in the forward, in the recomputed forward of a checkpointed layer, and for the input
gradient. The base weights are frozen and already quantized, so nothing trains through them:
here the dequantized weight and the activation (or the output gradient) are cast to e4m3 with
a scale per row and multiplied by ``torch._scaled_mm``, which Hopper and Ada run at twice the
bf16 rate. The LoRA products, their gradients and the optimizer are untouched.

Scales are row-wise: one per token of the activation, one per output feature of the weight
in the forward, one per input feature in the input gradient (the weight's transpose is cast
on its own, so each scale covers one row of the operand it multiplies). Every scale is an
amax over 448, e4m3's largest finite value, and the casts clamp so that no value becomes NaN.

The weight goes from its packed NF4 codes to e4m3 without a bf16 copy (``fp8_weights``;
on a GPU Triton kernels, ``fp8_kernels``, with each weight's scales found once), in the
forward and, transposed, in the backward. Nothing is kept for the backward but the module;
the activation is not needed (the base weight gets no gradient). q, k and v (and gate and
up) read the same input: it is cast once and the cast reused while that tensor lives
unchanged.
"""

from __future__ import annotations

import functools
import logging
import types
import weakref

from qlora_kfp.training import fp8_weights
from qlora_kfp.training.fp8_weights import E4M3_MAX, TINY

# _scaled_mm's operands must have both their dimensions a multiple of 16.
ALIGN = 16
log = logging.getLogger(__name__)


def cast_rows(t):
    """``t`` (2-D) in e4m3 with a float32 scale per row: ``t ≈ cast.float() * scale``."""
    import torch

    t = t.float()
    # The floor only keeps an all-zero row from dividing by zero: gradients can be far
    # below 1e-12, and must keep their size.
    amax = t.abs().amax(dim=1, keepdim=True).clamp(min=TINY)
    scale = amax / E4M3_MAX
    cast = (t / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return cast.contiguous(), scale  # row-major, as _scaled_mm wants its first operand


@functools.cache
def _compiled_cast():
    """``cast_rows`` as one fused kernel (inductor): a transpose's rows on a GPU, and the
    casts where the Triton kernels failed."""
    import torch

    return torch.compile(cast_rows, dynamic=True)


_BROKEN: dict = {}  # "Triton kernels" / "torch.compile": its first failure; not tried again


def _attempt(way: str, fn, *args):
    """``fn(*args)``, or None where ``way`` failed (now or before; said once): the caller
    then takes the next way down (Triton, then torch.compile, then eager torch)."""
    if way in _BROKEN:
        return None
    try:
        return fn(*args)
    except Exception as exc:  # no compiler in the image, a Triton or inductor bug: slower
        log.warning("FP8 casts: %s failed, using a slower way from now on: %s", way, exc)
        _BROKEN[way] = exc
        return None


def _triton_cast(t):
    from qlora_kfp.training import fp8_kernels

    return fp8_kernels.row_cast(t)


def _cast(t):
    """``cast_rows(t)`` by the fastest way that works here."""
    t = t.detach()  # one that requires grad would compile a second graph, with autograd
    if t.is_cuda:
        out = _attempt("Triton kernels", _triton_cast, t) if t.stride(1) == 1 else None
        out = out or _attempt("torch.compile", lambda t: _compiled_cast()(t), t)
        if out is not None:
            return out
    return cast_rows(t)


_LAST_INPUT: dict = {}  # the last input cast: q, k and v (gate and up) share theirs


def _forget(ref) -> None:
    if _LAST_INPUT.get("ref") is ref:
        _LAST_INPUT.clear()


def _input_cast(x, flat):
    """``_cast(flat)``, reused while ``x`` (the tensor a Linear was called with) is the same
    object at the same version: the next Linear reading it gets the same e4m3 rows."""
    if x.is_inference():  # no version counter to tell an in-place change
        return _cast(flat)
    hit = _LAST_INPUT.get("ref")
    if hit is not None and hit() is x and _LAST_INPUT["key"] == (x._version, flat.dtype):
        return _LAST_INPUT["cast"]
    cast = _cast(flat)
    _LAST_INPUT.clear()  # the entry dies with x, so a freed input's cast is not kept
    _LAST_INPUT.update(ref=weakref.ref(x, _forget), key=(x._version, flat.dtype), cast=cast)
    return cast


def supported(device=None) -> bool:
    """Whether the GPU multiplies e4m3 (compute capability 8.9: Ada, Hopper and later)."""
    import torch

    if not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def _matmul(a8, a_scale, b8_rows, b_scale, dtype):
    """``a @ b.T`` from row-cast operands: ``a`` [m, k], ``b`` [n, k], both scaled per row."""
    import torch

    return torch._scaled_mm(a8, b8_rows.t(), scale_a=a_scale, scale_b=b_scale.t(), out_dtype=dtype)


@functools.cache
def _base_matmul_fn():
    """The autograd function, built on first use so that importing needs no torch."""
    import torch

    class BaseMatmulFp8(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x2d, x_cast, weight):
            ctx.weight = weight
            x8, xs = x_cast()
            w8, ws = weight(False)
            return _matmul(x8, xs, w8, ws, x2d.dtype)

        @staticmethod
        def backward(ctx, grad):
            g8, gs = _cast(grad.contiguous())
            wt8, wts = ctx.weight(True)  # a scale per input feature
            return _matmul(g8, gs, wt8, wts, grad.dtype), None, None

    return BaseMatmulFp8


def base_matmul(x2d, x_cast, weight):
    """``x2d @ W.T`` in e4m3: ``x_cast()`` gives ``x2d``'s rows cast, ``weight(transposed)``
    the base weight ``W`` [n, k] (or ``W.T``) in e4m3 with a scale per row."""
    return _base_matmul_fn().apply(x2d, x_cast, weight)


def _on_gpu(t) -> bool:
    return t.is_cuda


def _weight_fn(weight, state):
    """``weight(transposed)`` for ``base_matmul``: from the packed codes where the layout
    allows (``fp8_weights``), else bitsandbytes' dequantization and a row cast."""
    import bitsandbytes as bnb

    def from_bnb(transposed):
        w = bnb.functional.dequantize_4bit(weight, state)
        return _cast(w.t() if transposed else w)

    def packed(transposed):
        if not _on_gpu(weight):
            return fp8_weights.e4m3(weight, state, transposed)
        out = _attempt("Triton kernels", fp8_weights.e4m3, weight, state, transposed, True)
        return out or from_bnb(transposed)

    return packed if fp8_weights.fits(state) else from_bnb


def _forward(self, x):
    """A ``bnb.nn.Linear4bit`` forward whose product runs in FP8 (``use_fp8``)."""
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

    # FSDP's flat parameters lose the weight's quant_state; bitsandbytes' own forward puts
    # back the module's copy first, and so does this one.
    fix_4bit_weight_quant_state_from_module(self)
    weight = self.weight
    state = weight.quant_state
    dtype = state.dtype
    flat = x.reshape(-1, x.shape[-1]).to(dtype)
    out = base_matmul(flat, lambda: _input_cast(x, flat), _weight_fn(weight.data, state))
    if self.bias is not None:
        out = out + self.bias.to(dtype)
    return out.view(*x.shape[:-1], out.shape[-1]).to(x.dtype)


def qualifies(shape, dtype, device_type: str) -> bool:
    """Whether a 4-bit weight of ``shape`` computing in ``dtype`` can multiply in FP8 here:
    both dimensions a multiple of 16, and on a GPU a bfloat16 model (row-scaled
    ``_scaled_mm`` writes bfloat16 on every GPU that has it; float16 and float32 only on
    Hopper with a recent cuBLAS). The CPU reference takes any float dtype."""
    import torch

    if any(d % ALIGN for d in shape):
        return False
    return device_type == "cpu" or dtype == torch.bfloat16


def use_fp8(model) -> int:
    """Run the product of every 4-bit Linear of ``model`` whose shape allows it in FP8.

    Returns:
        How many Linears now multiply in FP8 (the others keep bitsandbytes' forward).
    """
    import bitsandbytes as bnb

    count = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        state = getattr(module.weight, "quant_state", None)
        if state is None or not qualifies(state.shape, state.dtype, module.weight.device.type):
            continue
        module.forward = types.MethodType(_forward, module)
        count += 1
    return count


def resolve(mode: str) -> bool:
    """``fp8_base``: ``auto`` is on where the GPU multiplies e4m3; ``on`` also on the CPU
    (torch's reference ``_scaled_mm``, for tests)."""
    if mode == "auto":
        return supported()
    return mode == "on"
