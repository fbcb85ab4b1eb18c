"""LoRA's dropout + A projection with the mask regenerated in backward instead of stored.

peft computes the LoRA path of a Linear as ``lora_A(dropout(x))``. For backward, autograd
keeps the dropped-out copy of ``x`` (for A's gradient) and the dropout mask (for ``x``'s):
3 bytes an element on top of ``x`` itself, for each adapted Linear. On Llama shapes, with
all linear layers adapted, that is 70 of the 206 KB a token that a decoder layer keeps
(q, k and v each drop their shared input out on their own), measured on 8B shapes
(BENCHMARKS.md). Here the forward saves ``x`` (shared by q, k and v, so kept once) and the
RNG state the dropout drew from; the backward draws the same mask again from that state.
Same masks, same values, same gradients as peft's path (``tests/training/test_lora_dropout.py``);
one extra dropout kernel in backward, nothing stored.

Only ``torch.nn.Dropout`` in training mode with ``0 < p < 1`` takes this path; anything else
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
        def forward(ctx, x, weight, p):
            ctx.devices = [x.device] if x.is_cuda else []
            ctx.rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else torch.get_rng_state()
            dropped, _ = _dropout(x, p)
            out = torch.nn.functional.linear(dropped, weight)
            ctx.p = p
            ctx.save_for_backward(x, weight)
            return out

        @staticmethod
        @torch.amp.custom_bwd(device_type="cuda")
        def backward(ctx, grad):
            x, weight = ctx.saved_tensors
            with torch.random.fork_rng(devices=ctx.devices):
                if x.is_cuda:
                    torch.cuda.set_rng_state(ctx.rng, x.device)
                else:
                    torch.set_rng_state(ctx.rng)
                dropped, mask = _dropout(x, ctx.p)
            g = grad.reshape(-1, grad.shape[-1])
            # Under autocast the forward multiplied in the autocast dtype: do the same here.
            # One input-sized temporary at a time: the dropped input goes before grad_x comes.
            dtype = g.dtype
            grad_w = None
            if ctx.needs_input_grad[1]:
                grad_w = (g.t() @ dropped.reshape(-1, x.shape[-1]).to(dtype)).to(weight.dtype)
            del dropped
            grad_x = None
            if ctx.needs_input_grad[0]:
                grad_x = (g @ weight.to(dtype)).view(*x.shape[:-1], x.shape[-1])
                # native_dropout_backward's grad * mask * scale, in place (one rounding).
                grad_x = grad_x.mul_(mask).mul_(1.0 / (1.0 - ctx.p)).to(x.dtype)
            return grad_x, grad_w, None

    return DropoutLinear


def lora_a(dropout, x, weight):
    """``F.linear(dropout(x), weight)``, regenerating the mask in backward where it can.

    Args:
        dropout: peft's ``lora_dropout[adapter]`` module.
        x: The Linear's input.
        weight: ``lora_A[adapter].weight``.
    """
    import torch
    import torch.nn.functional as F

    p = getattr(dropout, "p", 0.0)
    if (
        isinstance(dropout, torch.nn.Dropout)
        and dropout.training
        and 0.0 < p < 1.0
        and torch.is_grad_enabled()
    ):
        return _function().apply(x, weight, p)
    return F.linear(dropout(x), weight)
