"""What autograd keeps: the tests' measure of activation memory on the CPU."""

from __future__ import annotations


def saved_bytes(fn) -> int:
    """Bytes autograd keeps for backward while ``fn`` runs (distinct storages)."""
    import torch

    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())
