"""A checkpoint's tensors one at a time, straight from its shard files.

The quantize stage compares every 4-bit weight with its 16-bit original. Building the 16-bit
model for that would hold all of it in memory at once (141 GB for a 70B model); reading the
originals from the checkpoint's files, one tensor at a time, holds one weight matrix.
``safe_open`` maps a safetensors file and reads only the tensor asked for; a PyTorch
``.bin`` shard is memory-mapped (``torch.load(mmap=True)``), so only what is read is paged
in.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from qlora_kfp.errors import SourceError
from qlora_kfp.storage import sources


def weight_files(source: str) -> list[Path]:
    """The weight shards of a model source (a folder, or a hub id: its cached snapshot)."""
    path = sources.model_source(source)
    if not Path(path).exists():  # a hub id: from_pretrained fetched (or will fetch) these
        from huggingface_hub import snapshot_download

        path = snapshot_download(path, allow_patterns=["*.safetensors", "*.bin", "*.json"])
    folder = Path(path)
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        raise SourceError(f"{source}: no *.safetensors or *.bin weight files")
    return files


def tensor_numel(files: Iterable[Path]) -> int:
    """Elements stored in the checkpoint (a tied weight is stored, and counted, once)."""
    import math

    from safetensors import safe_open

    total = 0
    for f in files:
        if f.suffix == ".safetensors":
            with safe_open(str(f), "pt") as st:
                total += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())  # noqa: SIM118 (not iterable)
        else:
            total += sum(t.numel() for t in _load_bin(f).values())
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
            state = _load_bin(f)
            for key in list(state):
                tensor = state.pop(key)
                if names is None or key in names:
                    yield key, tensor


def _load_bin(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
