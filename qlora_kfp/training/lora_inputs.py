"""LoRA A inputs computed again in backward from what a decoder layer keeps anyway.

Every adapted Linear's A product keeps its input for A's gradient (the 4-bit base products
keep nothing). Two kinds of those inputs are cheap functions of tensors the layer keeps
regardless:

* a norm's output (q, k and v take the first, gate and up the second): a function of the
  norm's input, which the norm's own backward keeps (the residual stream);
* the SwiGLU product ``silu(gate) * up`` that down takes: a function of gate and up, which
  the SwiGLU's backward keeps.

On Llama-8B shapes they are 44 of the 136 KB a token that a decoder layer keeps in bf16
(:func:`qlora_kfp.training.memory.kept_layer_bytes`): a third of every layer that is not
checkpointed, so ``auto`` checkpoints fewer layers in the same memory. The price is one
elementwise kernel (a norm, a SwiGLU) again in the A product's backward.

How: the norms' and the MLP's forwards mark their outputs with a recipe (:func:`mark`: the
very function that made the output, and its inputs); the A product
(:func:`qlora_kfp.training.lora_dropout.lora_a`) saves the inputs instead of the output and
calls the recipe in its backward. That backward runs before the norm's or the SwiGLU's own
(they need its gradient), so their inputs are still as the forward left them (Liger's SwiGLU
backward overwrites gate and up in place). The recipe is the forward's own kernel, so the
input made again is the forward's bit for bit. An output changed in place after it was marked
is not trusted (its version moved): its A product keeps it as before.

:func:`install` puts the marking forwards in; the train stage calls it when training begins
(:func:`callback`), after ``Trainer.train`` has applied Liger's kernels, which replace the
norms' and MLPs' forwards. Not under FSDP, whose parameters are gathered only while their own
module runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger(__name__)
_RECIPE = "_lora_input_recipe"
_MARKS = "_marks_lora_inputs"


def mark(out, remake: Callable, *sources):
    """Record that ``remake(*sources)`` makes ``out`` again, bit for bit; returns ``out``."""
    setattr(out, _RECIPE, (remake, sources, out._version))
    return out


def recipe(x) -> tuple[Callable | None, tuple]:
    """``(remake, sources)`` that make ``x`` again, or ``(None, ())`` when ``x`` has no recipe
    or was changed in place since it was marked."""
    found = getattr(x, _RECIPE, None)
    if found is None or found[2] != x._version:
        return None, ()
    return found[0], found[1]


def _marking_norm(norm) -> bool:
    inner = norm.forward
    if getattr(inner, _MARKS, False):
        return True

    def forward(hidden_states):
        import torch

        out = inner(hidden_states)
        if torch.is_grad_enabled() and out is not hidden_states:
            mark(out, inner, hidden_states)
        return out

    setattr(forward, _MARKS, True)
    norm.forward = forward
    return True


def _swiglu(mlp, fused_kernels: bool) -> Callable:
    """The SwiGLU product the MLP's forward computes: Liger's kernel where the Trainer would
    have patched it in, else the model's own activation."""
    if fused_kernels:
        from liger_kernel.ops import LigerSiLUMulFunction

        return LigerSiLUMulFunction.apply
    act = mlp.act_fn
    return lambda gate, up: act(gate) * up


def _marking_mlp(mlp, fused_kernels: bool) -> bool:
    if getattr(mlp.forward, _MARKS, False):
        return True
    act = getattr(getattr(mlp, "config", None), "hidden_act", None)
    if act not in ("silu", "swish") or not all(
        hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")
    ):
        return False
    product = _swiglu(mlp, fused_kernels)

    def forward(x):  # LlamaMLP's (and LigerSwiGLUMLP's) forward, its product marked
        import torch

        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        out = product(gate, up)
        if torch.is_grad_enabled():
            mark(out, product, gate, up)
        return mlp.down_proj(out)

    setattr(forward, _MARKS, True)
    mlp.forward = forward
    return True


def install(model, fused_kernels: bool) -> int:
    """Make the norms and SwiGLU MLPs of every decoder layer of ``model`` mark their outputs.

    Idempotent: a forward that marks already is left alone; one the Trainer replaced since
    (Liger) is wrapped again.

    Args:
        model: The peft model (its decoder layers' Linears adapted).
        fused_kernels: Whether Liger's kernels run (its SwiGLU then computes the product).

    Returns:
        How many modules mark their outputs.
    """
    from qlora_kfp.training import modeling

    n = 0
    for layer in modeling.decoder_layers(model):
        for name in ("input_layernorm", "post_attention_layernorm"):
            norm = getattr(layer, name, None)
            n += norm is not None and _marking_norm(norm)
        mlp = getattr(layer, "mlp", None)
        n += mlp is not None and _marking_mlp(mlp, fused_kernels)
    return n


def callback(model, fused_kernels: bool):
    """A Trainer callback that calls :func:`install` as training begins: ``Trainer.train``
    applies Liger's kernels first (replacing the forwards installed before it)."""
    from transformers import TrainerCallback

    class MarkLoraInputs(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            n = install(model, fused_kernels)
            log.info("LoRA inputs made again in backward: %d norms and MLPs mark them", n)

    return MarkLoraInputs()
