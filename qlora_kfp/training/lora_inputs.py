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
elementwise kernel (a norm, a SwiGLU) again in backward: once per marked output, shared by the
A products that take it (:class:`Remake`), three a layer where six took their inputs.

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
import weakref
from collections.abc import Callable

log = logging.getLogger(__name__)
_RECIPE = "_lora_input_recipe"
_MARKS = "_marks_lora_inputs"
SWIGLU, NORMS = "swiglu", "norms"
# Decoder layers laid out as Llama's: a SiLU-gated MLP of gate_proj, up_proj and down_proj,
# input_layernorm before attention, post_attention_layernorm before the MLP (not Gemma 2's
# four norms, nor Phi-3's fused gate_up_proj).
LLAMA_LAYOUT = ("llama", "mistral", "qwen2", "qwen3")
SILU = ("silu", "swish")  # the activations of a SwiGLU MLP


def parts(model_cfg, liger_norms: bool) -> tuple[str, ...]:
    """Which LoRA inputs are made again for a model (the memory estimate and :func:`install`
    both ask here): the SwiGLU product on Llama's layout; the norms' outputs too where Liger's
    RMSNorm runs (``liger_norms``). transformers' own RMSNorm keeps a float32 copy of its
    input, not the input: making its bf16 output again would keep the bf16 input instead,
    for nothing."""
    layout = getattr(model_cfg, "model_type", None) in LLAMA_LAYOUT
    if not layout or getattr(model_cfg, "hidden_act", None) not in SILU:
        return ()
    return (SWIGLU, NORMS) if liger_norms else (SWIGLU,)


class Remake:
    """``fn(*sources)`` made once for every A product that takes the same marked output.

    q, k and v take the first norm's output, gate and up the second's: each A product's
    backward needs it again, one after the other. The first to ask makes it, the last lets it
    go (the forward counted the takers: :func:`claim`), so a norm runs once again, not three
    times, and its output lives only between its first and last taker's backward."""

    __slots__ = ("fn", "refs", "version", "takers", "made")

    def __init__(self, fn: Callable, refs: tuple, version: int):
        self.fn, self.refs, self.version, self.takers, self.made = fn, refs, version, 0, None

    def __call__(self, *sources):
        made = self.made if self.made is not None else self.fn(*sources)
        self.takers -= 1
        self.made = made if self.takers > 0 else None
        return made


def mark(out, remake: Callable, *sources):
    """Record that ``remake(*sources)`` makes ``out`` again, bit for bit; returns ``out``.

    The sources are held weakly: a mark must not keep them alive where something else keeps
    ``out`` (peft's own forward, a fallback) and they would otherwise have been freed."""
    refs = tuple(weakref.ref(t) for t in sources)
    setattr(out, _RECIPE, Remake(remake, refs, out._version))
    return out


def recipe(x) -> tuple[Remake | None, tuple]:
    """``(remake, sources)`` that make ``x`` again, or ``(None, ())`` when ``x`` has no recipe,
    was changed in place since it was marked, or a source is gone."""
    found = getattr(x, _RECIPE, None)
    if found is None or found.version != x._version:
        return None, ()
    sources = tuple(ref() for ref in found.refs)
    if any(t is None for t in sources):
        return None, ()
    return found, sources


def claim(x) -> tuple[Remake | None, tuple]:
    """:func:`recipe`, counting the caller as one more backward that will call ``remake``
    exactly once (an A product that saves the sources instead of ``x``)."""
    remake, sources = recipe(x)
    if remake is not None:
        remake.takers += 1
    return remake, sources


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
    if act not in SILU or not all(
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


def install(model, which: tuple[str, ...], fused_kernels: bool) -> int:
    """Make the SwiGLU MLPs (and norms) of every decoder layer of ``model`` mark their outputs.

    Idempotent: a forward that marks already is left alone; one the Trainer replaced since
    (Liger) is wrapped again.

    Args:
        model: The peft model (its decoder layers' Linears adapted).
        which: What to mark (:func:`parts`).
        fused_kernels: Whether Liger's kernels run (its SwiGLU then computes the product).

    Returns:
        How many modules mark their outputs.
    """
    from qlora_kfp.training import modeling

    n = 0
    for layer in modeling.decoder_layers(model):
        if NORMS in which:
            for name in ("input_layernorm", "post_attention_layernorm"):
                norm = getattr(layer, name, None)
                n += norm is not None and _marking_norm(norm)
        mlp = getattr(layer, "mlp", None)
        n += SWIGLU in which and mlp is not None and _marking_mlp(mlp, fused_kernels)
    return n


def expected(which: tuple[str, ...], layers: int) -> int:
    """How many modules :func:`install` marks in ``layers`` decoder layers of Llama's layout."""
    return layers * ((SWIGLU in which) + 2 * (NORMS in which))


def callback(model, which: tuple[str, ...], fused_kernels: bool):
    """A Trainer callback that calls :func:`install` as training begins: ``Trainer.train``
    applies Liger's kernels first (replacing the forwards installed before it). Fewer marks
    than the memory plan counted on are a warning: the plan assumed less memory."""
    from transformers import TrainerCallback

    from qlora_kfp.training import modeling

    class MarkLoraInputs(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            n = install(model, which, fused_kernels)
            want = expected(which, len(modeling.decoder_layers(model)))
            log.info("LoRA inputs made again in backward (%s): %d modules mark them", which, n)
            if n < want:
                log.warning(
                    "only %d of the %d norms and MLPs the memory plan counted on mark their "
                    "outputs (a layout unlike Llama's?): the run may need more memory than "
                    "planned; set gradient_checkpointing_layers if it runs out",
                    n,
                    want,
                )

    return MarkLoraInputs()
