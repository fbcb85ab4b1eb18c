"""A LoRA adapter as edits to its base model's tensors, for merging one tensor at a time.

peft merges an adapter into a model built whole (``merge_and_unload``): 280 GB of float32 for
a 70B base. The same arithmetic, done on each base tensor as it is read from its shard, needs
only that tensor: :func:`read_edits` maps every tensor of the adapter to the base tensor it
changes, and :func:`apply` computes the merged tensor with the operations of peft's ``merge``
(``peft/tuners/lora/layer.py`` and ``variants.py``), in the same order: on the same device
the result is peft's to the bit. peft's own key mapping (``_peft_key_to_original_key``) walks
a built model; here the names follow how peft saves an adapter (``base_model.model.`` before
the module's name, ``lora_A.weight`` after it, the adapter's name removed).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from qlora_kfp.errors import ArtifactError

# What peft's PeftModel for a causal LM puts before the base model's own tensor names.
PREFIX = "base_model.model."
# adapter_config.json fields of LoRA variants whose merge is not W + scaling * B @ A (or DoRA's
# rescaling of it): a bias on lora_B, replicated layers, adapted parameters instead of modules,
# trained token rows, quantization-aware or block-diagonal LoRA, routed or activated adapters.
UNSUPPORTED = (
    "lora_bias",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    "use_qalora",
    "use_bdlora",
    "arrow_config",
    "alora_invocation_tokens",
    "monteclora_config",
    "kasa_config",
    "velora_config",
)
# Initializations that leave the base weights as they were (PiSSA, OLoRA, CorDA, LoftQ and
# LoRA-GA change them, so the adapter only fits the base they changed).
PLAIN_INIT = (True, False, "gaussian")


@dataclass
class Edit:
    """What the adapter does to one base tensor: replace it, and/or add a LoRA delta."""

    replace: object = None  # a tensor of the adapter's (modules_to_save, a bias, an embedding)
    lora_a: object = None
    lora_b: object = None
    magnitude: object = None  # DoRA's per-output-row magnitude
    embedding: bool = False  # lora_embedding_A/B: the delta is (B @ A) transposed
    scaling: float = 1.0
    keys: list[str] = field(default_factory=list)  # the adapter's tensors, for messages


def read_config(adapter_dir: str | Path):
    """The adapter's ``LoraConfig``, after refusing what cannot be merged tensor by tensor.

    Raises:
        ArtifactError: naming the adapter_config.json field and its value, in one line.
    """
    from peft import PeftConfig

    path = Path(adapter_dir) / "adapter_config.json"
    raw = json.loads(path.read_text())
    if raw.get("peft_type") != "LORA":
        raise ArtifactError(
            f"{path}: peft_type={raw.get('peft_type')!r}; only LORA adapters can be merged"
        )
    for name in UNSUPPORTED:
        if raw.get(name):
            raise ArtifactError(
                f"{path}: {name}={raw[name]!r} is a LoRA variant the merge stage cannot fold "
                "into the base weights; train without it"
            )
    if raw.get("init_lora_weights", True) not in PLAIN_INIT:
        raise ArtifactError(
            f"{path}: init_lora_weights={raw['init_lora_weights']!r} changes the base weights "
            "when the adapter is made; merge it with peft into the base it changed"
        )
    return PeftConfig.from_pretrained(str(adapter_dir))


def read_edits(adapter_dir: str | Path, config) -> dict[str, Edit]:
    """Base tensor name -> its :class:`Edit`, from the adapter's weights (small: read whole).

    Raises:
        ArtifactError: for a tensor name the merge does not know (every one must be used).
    """
    from peft.utils import load_peft_weights

    edits: dict[str, Edit] = {}
    for key, tensor in load_peft_weights(str(adapter_dir), device="cpu").items():
        name = key.removeprefix(PREFIX)
        module, _, leaf = name.removesuffix(".weight").rpartition(".")
        if leaf in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
            edit = edits.setdefault(f"{module}.weight", Edit())
            setattr(edit, "lora_" + leaf[-1].lower(), tensor)
            edit.embedding = leaf.startswith("lora_embedding")
            edit.scaling = _scaling(config, module)
        elif leaf == "lora_magnitude_vector":  # DoRA (".weight" after it in older peft)
            edit = edits.setdefault(f"{module}.weight", Edit())
            edit.magnitude = tensor
        elif ".lora_" in name or not key.startswith(PREFIX):
            raise ArtifactError(
                f"{adapter_dir}: adapter tensor {key} is of a kind the merge does not know; "
                "nothing of it would reach the merged model"
            )
        else:  # modules_to_save, a trained bias, a saved embedding: the adapter's own copy
            edit = edits.setdefault(name.replace(".base_layer.", "."), Edit())
            edit.replace = tensor
        edit.keys.append(key)
    for name, edit in edits.items():
        if (edit.lora_a is None) != (edit.lora_b is None) or (
            edit.magnitude is not None and edit.lora_a is None
        ):
            raise ArtifactError(f"{adapter_dir}: {edit.keys[0]} has no lora_A/lora_B partner")
        if edit.magnitude is not None and edit.embedding:
            raise ArtifactError(
                f"{adapter_dir}/adapter_config.json: use_dora=True on the embedding {name}: "
                "the merge stage folds DoRA into linear layers only"
            )
    return edits


def _scaling(config, module: str) -> float:
    """peft's ``LoraLayer.update_layer``: alpha / sqrt(r) with rsLoRA, else alpha / r (each
    from its pattern where rank_pattern or alpha_pattern names the module)."""
    from peft.utils.other import get_pattern_key

    alpha = config.alpha_pattern.get(
        get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha
    )
    r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
    return alpha / math.sqrt(r) if config.use_rslora else alpha / r


def apply(weight, edit: Edit, fan_in_fan_out: bool):
    """The merged tensor, in float32: peft's ``merge`` (``safe_merge=False``) of one layer."""
    import torch

    w = (edit.replace if edit.replace is not None else weight).to(torch.float32)
    if edit.lora_a is None:
        return w
    if tuple(w.shape) != _lora_shape(edit, fan_in_fan_out):
        raise ArtifactError(
            f"{edit.keys[0]}: LoRA of shape {_lora_shape(edit, fan_in_fan_out)}, base tensor "
            f"{tuple(w.shape)}"
        )
    delta = delta_weight(edit, fan_in_fan_out)
    if edit.magnitude is None:
        return w + delta
    # DoRA (peft's DoraLinearVariant.merge_unsafe): rescale each output row of W + delta to
    # the trained magnitude, by its norm computed in float32.
    flip = (lambda t: t.T) if fan_in_fan_out else (lambda t: t)
    norm = torch.linalg.norm(flip(w) + flip(delta), dim=1).to(torch.float32)
    factor = flip((edit.magnitude.to(torch.float32) / norm).view(-1, 1))
    return factor * (w + delta)


def delta_weight(edit: Edit, fan_in_fan_out: bool):
    """``transpose(B @ A) * scaling`` in float32, as peft's ``get_delta_weight``."""
    import torch

    b, a = edit.lora_b.to(torch.float32), edit.lora_a.to(torch.float32)
    delta = b @ a
    # An embedding's A and B are stored the other way round (peft transposes always).
    if edit.embedding or fan_in_fan_out:
        delta = delta.T
    return delta * edit.scaling


def _lora_shape(edit: Edit, fan_in_fan_out: bool) -> tuple[int, int]:
    shape = (edit.lora_b.shape[0], edit.lora_a.shape[-1])
    return shape[::-1] if edit.embedding or fan_in_fan_out else shape
