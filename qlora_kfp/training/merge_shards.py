"""Merge a LoRA adapter into its 16-bit base one weights shard at a time.

Building the base model to merge it (peft's ``merge_and_unload``) holds all of it: 280 GB of
float32 for a 70B base. Here each base tensor is read from its shard, merged in float32 if the
adapter changes it (:mod:`qlora_kfp.training.lora_delta`), cast to the merged model's dtype and
kept until its output shard is complete; then the shard is written and dropped. Memory holds
one output shard (``SHARD_SIZE``), the adapter, and one tensor in float32.
"""

from __future__ import annotations

import json
from pathlib import Path

from qlora_kfp.errors import ArtifactError
from qlora_kfp.training import lora_delta, modeling, shards

# safetensors' dtype names (its file header) -> torch's: the float ones transformers loads
# (modeling.FLOAT_DTYPES), and the integer and bool buffers a model may also store.
DTYPES = {
    **modeling.FLOAT_DTYPES,
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def merge_to_folder(base_folder: str, adapter_dir: str, out: Path, dtype: str, shard_size) -> dict:
    """Write the merged weights (``model*.safetensors`` and, when several, their index).

    Args:
        base_folder: A local folder of the 16-bit base (``shards.local_folder``).
        adapter_dir: The adapter (``adapter_config.json``, ``adapter_model.safetensors``).
        out: The folder to write into.
        dtype: The merged model's float dtype (its other tensors keep theirs).
        shard_size: Largest output shard, as ``save_pretrained``'s ``max_shard_size``.

    Returns:
        ``{"merged_tensors": ..., "shards": ...}``.

    Raises:
        ArtifactError: an adapter tensor whose base tensor is missing or of another shape, or
            an adapter the merge cannot fold (named by ``lora_delta``).
    """
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    config = lora_delta.read_config(adapter_dir)
    edits = lora_delta.read_edits(adapter_dir, config)
    specs = _specs(shards.weight_files(base_folder))
    missing = [name for name in edits if name not in specs]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ArtifactError(
            f"{adapter_dir}: adapter tensor {edits[missing[0]].keys[0]} changes {missing[0]}, "
            f"which the base model {base_folder} does not have{more}; merge the adapter into "
            "the base model it was trained on"
        )
    target = getattr(torch, dtype)
    # The output's tensors as empty (meta) tensors of their final dtype: huggingface_hub
    # splits them into shards by size the way save_pretrained does, before any is read.
    planned = {
        name: torch.empty(shape, dtype=target if dt.is_floating_point else dt, device="meta")
        for name, (_, dt, shape) in specs.items()
    }
    split = split_torch_state_dict_into_shards(planned, max_shard_size=shard_size)
    reader = _Reader()
    for filename, names in split.filename_to_tensors.items():
        tensors = {}
        for name in names:
            tensor = reader.get(specs[name][0], name)
            if name in edits:
                tensor = _merged(tensor, edits[name], config.fan_in_fan_out, base_folder)
            tensors[name] = tensor.to(planned[name].dtype).contiguous()
            del tensor  # the float32 copy: one at a time
        save_file(tensors, str(out / filename), metadata={"format": "pt"})
        del tensors
    reader.close()
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return {"merged_tensors": len(edits), "shards": len(split.filename_to_tensors)}


def _merged(tensor, edit: lora_delta.Edit, fan_in_fan_out: bool, base_folder: str):
    if edit.replace is not None and tuple(edit.replace.shape) != tuple(tensor.shape):
        raise ArtifactError(
            f"adapter tensor {edit.keys[0]} is of shape {tuple(edit.replace.shape)}, the base "
            f"model {base_folder}'s tensor {tuple(tensor.shape)}; merge the adapter into the "
            "base model it was trained on"
        )
    return lora_delta.apply(tensor, edit, fan_in_fan_out)


def _specs(files: list[Path]) -> dict:
    """``name -> (file, torch dtype, shape)`` of every base tensor, in file order, read from
    the safetensors headers (a ``.bin`` shard is memory-mapped: only its metadata is read)."""
    import torch

    specs = {}
    for f, name, dt, shape in shards.header_tensors(files):
        if dt not in DTYPES:
            raise ArtifactError(f"{f}: tensor {name} is {dt}; the merge reads 16/32-bit models")
        specs[name] = (f, getattr(torch, DTYPES[dt]), shape)
    for f in files:
        if f.suffix != ".safetensors":
            for name, tensor in shards.tensors([f]):
                specs[name] = (f, tensor.dtype, list(tensor.shape))
    return specs


class _Reader:
    """One tensor at a time from the shard that holds it; one shard open at a time (the
    output's order follows the files', so each is opened once)."""

    def __init__(self) -> None:
        self.path, self.handle = None, None

    def get(self, path: Path, name: str):
        if path != self.path:
            self.close()
            from safetensors import safe_open

            self.path = path
            self.handle = (
                safe_open(str(path), "pt")
                if path.suffix == ".safetensors"
                else shards.load_bin(path)
            )
        if isinstance(self.handle, dict):
            return self.handle[name]
        return self.handle.get_tensor(name)

    def close(self) -> None:
        self.path = self.handle = None
