"""The LoRA update of every adapted Linear as one ``addmm``: scale and add inside the GEMM.

peft's forward for a LoRA Linear (4-bit or not) is::

    result = base_layer(x).clone()                      # 4-bit: a "defensive" copy
    result = result + lora_B(lora_A(dropout(x))) * scaling

which walks an output-sized tensor four times (clone, the B product, the scaling, the add)
in every forward and every recomputed forward, and once more (the scaling) in the backward.
On Llama-8B shapes the outputs of the seven Linears hold 43k values per token per layer.
Here the same arithmetic is ``addmm(base_layer(x), lora_A(dropout(x)), lora_B.T,
alpha=scaling)``: the product, scaling and add happen in the GEMM's epilogue, in float32
before one rounding (peft rounds three times), and autograd's addmm backward scales only the
rank-sized gradient. Dropout is peft's own module's draw, in the same order, so a seed gives
the same masks as peft's path; its mask is drawn again in backward instead of being stored
(``lora_dropout.lora_a``).

Only the plain case is replaced: one active adapter, no DoRA or other variant, not merged,
no per-call adapter names, and matching dtypes (or autocast). Anything else runs peft's
forward unchanged.
"""

from __future__ import annotations

import types


def _fused_forward(self, x, *args, **kwargs):
    import torch

    from qlora_kfp.training import lora_dropout

    names = self.active_adapters
    name = names[0] if len(names) == 1 else None
    if (
        args
        or kwargs
        or name is None
        or self.disable_adapters
        or self.merged
        or name not in self.lora_A
        or name in getattr(self, "lora_variant", {})
    ):
        return self._peft_forward(x, *args, **kwargs)
    a, b = self.lora_A[name].weight, self.lora_B[name].weight
    if not torch.is_autocast_enabled(x.device.type) and x.dtype != a.dtype:
        return self._peft_forward(x)  # peft casts x to the adapter dtype and back
    result = self.base_layer(x)
    h = lora_dropout.lora_a(self.lora_dropout[name], x, a)
    out = torch.addmm(
        result.reshape(-1, result.shape[-1]),
        h.reshape(-1, h.shape[-1]),
        b.t(),
        alpha=self.scaling[name],
    )
    return out.view(result.shape)


def fuse_lora_updates(model) -> int:
    """Route the plain-LoRA forward of every adapted Linear in ``model`` through ``addmm``.

    Returns:
        How many layers now use the fused forward.
    """
    from peft.tuners.lora import Linear as LoraLinear

    kinds: tuple[type, ...] = (LoraLinear,)
    try:
        from peft.tuners.lora.bnb import Linear4bit

        kinds += (Linear4bit,)
    except ImportError:  # peft without bitsandbytes
        pass
    n = 0
    for module in model.modules():
        if isinstance(module, kinds) and not hasattr(module, "_peft_forward"):
            module._peft_forward = module.forward
            module.forward = types.MethodType(_fused_forward, module)
            n += 1
    return n
