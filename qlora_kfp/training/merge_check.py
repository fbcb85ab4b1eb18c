"""The merge stage's logit check, with each model held within a memory budget.

Three sets of float32 logits on the same probe inputs:

* ``before``: base + adapter, unmerged (peft), the reference;
* ``rounded``: the same model, each adapted layer computing with peft's merge of its weight
  (``W + get_delta_weight()``, or DoRA's ``merge_safe``) and every weight cast to the merged
  model's dtype and back, as the merge stage casts what it writes;
* ``after``: the merged model as written, loaded back from its folder.

``after`` must equal ``rounded`` within the tolerance: the written files are peft's merge,
cast. ``rounded`` against ``before`` is what the cast alone changes (nothing in float32).

Each model is loaded by transformers' big-model loading (``device_map="auto"``) within
``max_memory``; its other layers are offloaded to a scratch folder on disk, which accelerate
reads layer by layer during the forward pass. peft loads an adapter onto such a model itself
(``PeftModel.from_pretrained`` re-dispatches it). peft's ``merge_and_unload`` is not used:
on a disk-offloaded model (peft 0.21) it keeps every merged layer in CPU memory (its
``onload_layer`` re-makes the layer's weights map as a dict of CPU tensors and never writes
it back to disk); here each layer's merged weight exists only during its own forward pass.
"""

from __future__ import annotations

import contextlib
import functools
import gc
from collections.abc import Mapping
from pathlib import Path

from qlora_kfp.training import autofit, modeling


def max_memory(gib: float) -> dict:
    """accelerate's ``max_memory`` for a budget of ``gib`` on each device (each GPU and the
    CPU); 0: what is free on each GPU (accelerate's estimate) and 80% of what the host can
    still give (its estimate, psutil's, does not see a pod's memory limit; the rest is room
    for the float32 copies loading makes)."""
    import torch
    from accelerate.utils import get_max_memory

    if not gib:
        budget = get_max_memory()
        host = autofit.host_available_gib()
        if host:
            budget["cpu"] = min(budget["cpu"], int(0.8 * host * 2**30))
        return budget
    limit = int(gib * 2**30)
    return {**dict.fromkeys(range(torch.cuda.device_count()), limit), "cpu": limit}


def compare(
    base: str, adapter_dir: str, written: Path, ids, dtype: str, budget: dict, scratch, trust=False
):
    """``(before, rounded, after)`` logits, float32, on the CPU (see the module's docstring).

    Args:
        base: The base model's local folder.
        adapter_dir: The adapter.
        written: The merged model's folder.
        ids: Probe input ids.
        dtype: The merged model's dtype.
        budget: accelerate's ``max_memory`` for each model (:func:`max_memory`).
        scratch: An empty folder for offloaded layers (removed by the caller).
        trust: ``trust_remote_code`` for both models.
    """
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    scratch = Path(scratch).resolve()
    paths = [str(Path(p).resolve()) for p in (base, adapter_dir, written)]
    # peft (0.21) copies each disk-offloaded base shard it re-dispatches (with the adapter's
    # tensors added) to the shard's absolute path made relative to the working folder: from
    # the scratch folder, the copies never land beside the base or in the caller's folder.
    with contextlib.chdir(scratch), torch.no_grad():
        model = _load(paths[0], budget, scratch / "base", trust)
        model = PeftModel.from_pretrained(
            model, paths[1], max_memory=budget, offload_folder=str(scratch / "peft")
        )
        model.eval()
        before = _logits(model, ids)
        lora = [m for m in model.modules() if isinstance(m, LoraLayer)]
        inside = {id(sub) for layer in lora for sub in layer.modules()}
        _round(model, getattr(torch, dtype), skip=inside)
        for layer in lora:
            layer.register_forward_hook(functools.partial(_merged_output, dtype=dtype))
        rounded = _logits(model, ids)
        del model, lora
        gc.collect()  # one model at a time
        model = _load(paths[2], budget, scratch / "merged", trust)
        after = _logits(model, ids)
        del model
        gc.collect()
    return before, rounded, after


def _load(path: str, budget: dict, offload: Path, trust: bool):
    import torch

    placement = dict(device_map="auto", max_memory=budget, offload_folder=str(offload))
    return modeling.load_model(
        path, dtype=torch.float32, trust_remote_code=trust, complete=True, placement=placement
    )


def _logits(model, ids):
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model(input_ids=ids.to(device)).logits.float().cpu()


def _round(model, dtype, skip: set[int]) -> None:
    """Cast every float weight of the modules not in ``skip`` (ids) to ``dtype`` and back:
    those in memory now, offloaded ones as accelerate loads them for the forward pass."""
    for module in model.modules():
        if id(module) in skip:
            continue
        for hook in _offload_hooks(module):
            hook.weights_map = _Rounded(hook.weights_map, dtype)
        for p in module.parameters(recurse=False):
            if p.device.type != "meta" and p.is_floating_point():
                p.data = p.data.to(dtype).to(p.dtype)


def _merged_output(layer, args, output, dtype: str):
    """A forward hook of a LoRA layer: its output recomputed by its base layer with the
    merged weight (and its bias), cast to ``dtype`` and back."""
    import torch

    adapter = layer.active_adapters[0]
    with _onloaded(layer):
        base = layer.get_base_layer()
        weight = base.weight.detach()
        if adapter in layer.lora_variant:  # DoRA: peft's merge of one layer, not in place
            merged = layer.lora_variant[adapter].merge_safe(layer, adapter, weight.clone())
        else:  # peft's merge(safe_merge=False): weight += get_delta_weight()
            merged = weight + layer.get_delta_weight(adapter)
        kept = {"weight": weight}
        base.weight.data = merged.to(getattr(torch, dtype)).to(merged.dtype)
        if getattr(base, "bias", None) is not None:
            kept["bias"] = base.bias.detach()
            base.bias.data = kept["bias"].to(getattr(torch, dtype)).to(kept["bias"].dtype)
        try:
            # The class's forward: the instance's is accelerate's hook, which would load the
            # offloaded weights over these.
            return type(base).forward(base, args[0]).to(output.dtype)
        finally:
            for name, value in kept.items():
                getattr(base, name).data = value


@contextlib.contextmanager
def _onloaded(layer):
    """The offloaded weights of ``layer`` and its submodules on the execution device, as
    accelerate's hooks load them around a forward pass (and drop them after)."""
    hooked = [(m, h) for m in layer.modules() for h in _offload_hooks(m)]
    for module, hook in hooked:
        hook.pre_forward(module)
    try:
        yield
    finally:
        for module, hook in hooked:
            hook.post_forward(module, None)


def _offload_hooks(module) -> list:
    hook = getattr(module, "_hf_hook", None)
    return [
        h
        for h in getattr(hook, "hooks", [hook])  # a SequentialHook holds several
        if getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None
    ]


class _Rounded(Mapping):
    """An offloaded module's weights, each cast to ``dtype`` and back when read."""

    def __init__(self, inner: Mapping, dtype) -> None:
        self.inner, self.dtype = inner, dtype

    def __getitem__(self, key: str):
        value = self.inner[key]
        return value.to(self.dtype).to(value.dtype) if value.is_floating_point() else value

    def __iter__(self):
        return iter(self.inner)

    def __len__(self) -> int:
        return len(self.inner)
