"""A model's weights one tensor at a time, straight from its shard files.

The quantize stage compares every 4-bit weight with its 16-bit original. Building the 16-bit
model for that would hold all of it in memory at once (141 GB for a 70B model); reading the
originals from the weights files, one tensor at a time, holds one weight matrix.
``safe_open`` maps a safetensors file and reads only the tensor asked for; a PyTorch
``.bin`` shard is memory-mapped (``torch.load(mmap=True)``), so only what is read is paged
in.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from qlora_kfp.errors import SourceError
from qlora_kfp.storage import sources

# What transformers loads, in its order of preference (transformers/utils: SAFE_WEIGHTS_NAME,
# SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME): a repo may ship the same weights
# in several forms (Llama-2: safetensors and .bin shards; Mistral: consolidated.safetensors),
# and reading, or downloading, the others would count and fetch the weights twice.
WEIGHTS_FILES = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)


def weight_files(source: str) -> list[Path]:
    """The weight shards transformers loads from a model source (a folder, or a hub id: its
    local snapshot, which ``from_pretrained`` has already fetched)."""
    path = sources.model_source(source)
    folder = Path(path) if Path(path).exists() else _hub_snapshot(path, source)
    for index, single in WEIGHTS_FILES:
        if (folder / index).is_file():
            # sources.model_source has checked every shard it names is there and whole.
            names = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            return [folder / n for n in names]
        if (folder / single).is_file():
            return [folder / single]
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        raise SourceError(f"{source}: no *.safetensors or *.bin weight files")
    return files


# A hub model's files the merge stage needs beside its weights: config, generation config,
# tokenizer, remote code. Its weights are fetched in transformers' preferred form only.
HUB_FILES = ("*.json", "*.model", "*.txt", "*.py", "*.jinja", "*.tiktoken")
HUB_WEIGHTS = (
    ("model.safetensors", "model-*-of-*.safetensors"),
    ("pytorch_model.bin", "pytorch_model-*-of-*.bin"),
)


def local_folder(source: str) -> Path:
    """A model source as a local folder: a folder as it is, an ``s3://`` URI's cached copy, a
    hub id's snapshot (downloaded unless cached; ``HF_HUB_OFFLINE=1`` takes the cache only).

    Raises:
        SourceError: naming the source, in one line.
    """
    path = sources.model_source(source)
    if Path(path).exists():
        return Path(path)
    from huggingface_hub import snapshot_download

    try:
        for weights in HUB_WEIGHTS:
            folder = Path(snapshot_download(path, allow_patterns=[*HUB_FILES, *weights]))
            if any(any(folder.glob(pattern)) for pattern in weights):
                return folder
    except Exception as exc:  # noqa: BLE001 - a library error is not a one-line message
        raise SourceError(f"{source}: cannot download ({sources.first_line(exc)})") from None
    raise SourceError(f"{source}: no model.safetensors or pytorch_model.bin weight files")


def _hub_snapshot(repo_id: str, source: str) -> Path:
    """The local snapshot of a hub model: no download (the files are from_pretrained's)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as exc:  # noqa: BLE001 - a library error is not a one-line message
        raise SourceError(f"{source}: not in the local hub cache ({type(exc).__name__})") from None


def tensor_numel(files: Iterable[Path]) -> int:
    """Elements stored in the weights files (a tied weight is stored, and counted, once)."""
    import math

    from safetensors import safe_open

    total = 0
    for f in files:
        if f.suffix == ".safetensors":
            with safe_open(str(f), "pt") as st:
                total += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())  # noqa: SIM118 (not iterable)
        else:
            total += sum(t.numel() for t in load_bin(f).values())
    return total


def tensors(files: Iterable[Path], names: set[str] | None = None) -> Iterator[tuple[str, object]]:
    """``(name, tensor)`` for each tensor in ``files`` (only ``names`` when given), read one at
    a time; drop each before asking for the next to keep one in memory."""
    from safetensors import safe_open

    for f in files:
        if f.suffix == ".safetensors":
            with safe_open(str(f), "pt") as st:
                for key in st.keys():  # noqa: SIM118 (safe_open is not iterable)
                    if names is None or key in names:
                        yield key, st.get_tensor(key)
        else:
            state = load_bin(f)
            for key in list(state):
                tensor = state.pop(key)
                if names is None or key in names:
                    yield key, tensor


def header_tensors(files: Iterable[Path]) -> Iterator[tuple[Path, str, str, list[int]]]:
    """``(file, name, dtype, shape)`` of each tensor of the safetensors ``files``, read from
    their headers alone (a length and a JSON table: nothing of the weights is read); the
    dtype as safetensors writes it (``BF16``, ``F32``, ``I8``...). Other files are skipped."""
    for f in files:
        if f.suffix != ".safetensors":
            continue
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for name, entry in header.items():
            if name != "__metadata__":
                yield f, name, entry["dtype"], list(entry["shape"])


def load_bin(path: Path) -> dict:
    """A PyTorch weights file, memory-mapped (only what is read is paged in)."""
    import torch

    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
