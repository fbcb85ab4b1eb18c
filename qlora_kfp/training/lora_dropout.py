"""LoRA's dropout + A projection, keeping neither a dropped-out copy nor, where it can, the input.

peft computes the LoRA path of a Linear as ``lora_A(dropout(x))``. For backward, autograd
keeps the dropped-out copy of ``x`` (for A's gradient) and the dropout mask (for ``x``'s):
3 bytes an element on top of ``x`` itself, for each adapted Linear. On Llama shapes, with
all linear layers adapted, that is 70 of the 206 KB a token that a decoder layer keeps
(q, k and v each drop their shared input out on their own), measured on 8B shapes
(BENCHMARKS.md). Here the forward saves ``x`` (shared by q, k and v, so kept once) and the
RNG state the dropout drew from; the backward draws the same mask again from that state.
Same masks, same values, same gradients as peft's path (``tests/training/test_lora_dropout.py``);
one extra dropout kernel in backward, nothing stored.

Where ``x`` itself is a cheap function of tensors the layer keeps anyway (a norm's output, the
SwiGLU product: :mod:`qlora_kfp.training.lora_inputs`), the forward saves those instead and
the backward computes ``x`` again: the A product then keeps nothing of its own.

Only ``torch.nn.Dropout`` in training mode with ``0 < p < 1`` draws masks; anything else
(``nn.Identity`` for ``lora_dropout=0``, eval mode) runs as peft does.
"""

from __future__ import annotations

import functools


def _dropout(x, p: float):
    """``nn.Dropout``'s draw (on CUDA, ``F.dropout`` runs this very kernel), with its mask."""
    import torch

    return torch.native_dropout(x, p, True)


@functools.cache
def _function():
    import torch

    class DropoutLinear(torch.autograd.Function):
        @staticmethod
        @torch.amp.custom_fwd(device_type="cuda")
        def forward(ctx, x, weight, p, remake, *sources):
            ctx.p, ctx.remake, ctx.shape = p, remake, x.shape
            if p:
                ctx.devices = [x.device] if x.is_cuda else []
                ctx.rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else torch.get_rng_state()
                dropped, _ = _dropout(x, p)
            else:
                dropped = x
            out = torch.nn.functional.linear(dropped, weight)
            # x's recipe and ingredients (kept anyway by the layers that made them), or x.
            ctx.save_for_backward(weight, *(sources if remake is not None else (x,)))
            return out

        @staticmethod
        @torch.amp.custom_bwd(device_type="cuda")
        def backward(ctx, grad):
            weight, *kept = ctx.saved_tensors
            x = ctx.remake(*kept) if ctx.remake is not None else kept[0]
            mask = None
            if ctx.p:
                with torch.random.fork_rng(devices=ctx.devices):
                    if x.is_cuda:
                        torch.cuda.set_rng_state(ctx.rng, x.device)
                    else:
                        torch.set_rng_state(ctx.rng)
                    dropped, mask = _dropout(x, ctx.p)
            else:
                dropped = x
            g = grad.reshape(-1, grad.shape[-1])
            # Under autocast the forward multiplied in the autocast dtype: do the same here.
            # One input-sized temporary at a time: the dropped input goes before grad_x comes.
            dtype, width = g.dtype, ctx.shape[-1]
            grad_w = None
            if ctx.needs_input_grad[1]:
                grad_w = (g.t() @ dropped.reshape(-1, width).to(dtype)).to(weight.dtype)
            x_dtype = x.dtype
            del dropped, x
            grad_x = None
            if ctx.needs_input_grad[0]:
                grad_x = (g @ weight.to(dtype)).view(*ctx.shape[:-1], width)
                if mask is not None:  # native_dropout_backward's grad * mask * scale, in place
                    grad_x = grad_x.mul_(mask).mul_(1.0 / (1.0 - ctx.p))
                grad_x = grad_x.to(x_dtype)
            return grad_x, grad_w, None, None, *(None for _ in kept)

    return DropoutLinear


def lora_a(dropout, x, weight):
    """``F.linear(dropout(x), weight)``, regenerating the mask in backward where it can, and
    ``x`` too where :func:`qlora_kfp.training.lora_inputs.recipe` has one for it (made once
    for all the Linears that take it: :class:`~qlora_kfp.training.lora_inputs.Remake`).

    Args:
        dropout: peft's ``lora_dropout[adapter]`` module.
        x: The Linear's input.
        weight: ``lora_A[adapter].weight``.
    """
    import torch
    import torch.nn.functional as F

    from qlora_kfp.training import lora_inputs

    p = getattr(dropout, "p", 0.0)
    is_dropout = isinstance(dropout, torch.nn.Dropout)
    drops = is_dropout and dropout.training and 0.0 < p < 1.0
    # Dropout that leaves x as it is: nn.Identity (lora_dropout=0), eval mode, p=0.
    plain = isinstance(dropout, torch.nn.Identity) or (is_dropout and not drops and p < 1.0)
    if not torch.is_grad_enabled() or not (drops or plain):
        return F.linear(dropout(x), weight)
    remake, sources = lora_inputs.claim(x)
    if not drops and remake is None:
        return F.linear(x, weight)
    return _function().apply(x, weight, p if drops else 0.0, remake, *sources)
