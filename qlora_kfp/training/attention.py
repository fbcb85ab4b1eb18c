"""Variable-length ("varlen") attention for packed rows, registered with transformers.

With ``packing`` on, a row holds several documents. The ``sdpa`` path hands SDPA a
block-diagonal boolean mask built from the position ids; with a mask SDPA cannot use its
flash kernels and computes every query against every key of the row. The ``varlen`` path
flattens the batch to ``(tokens, heads, head_dim)`` and runs causal flash attention per
document from cumulative document lengths (``cu_seq_lens``), the layout of flash-attn's
``flash_attn_varlen_func``. The kernel is PyTorch's own (``torch.nn.attention.varlen``,
CUDA, 16-bit inputs), so no extra package is needed.

The collator (``batching.collate_packed``) supplies ``cu_seq_lens_q``/``max_length_q``, the
keyword names transformers forwards from ``model(**batch)`` to every attention call; with
them no layer has to derive the lengths from the position ids (a GPU sync per layer).
Without a CUDA kernel (the CPU), each document runs through SDPA on its own: same result,
slow, there so the path can be tested anywhere.
"""

from __future__ import annotations

import functools
import inspect
import logging

log = logging.getLogger(__name__)

NAME = "varlen"


@functools.cache
def kernel():
    """PyTorch's varlen flash-attention function, or None where it cannot run."""
    import torch

    if not torch.cuda.is_available():
        return None
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.10
        return None
    return varlen_attn


def resolve(name: str, packing: str, has_kernel: bool | None = None) -> str:
    """``auto``: ``varlen`` for packed rows on a GPU with the kernel, else ``sdpa``.

    ``has_kernel``: whether the training machine has the kernel (default: this machine).
    """
    has_kernel = kernel() is not None if has_kernel is None else has_kernel
    if name == NAME and not has_kernel:
        log.warning(
            "attn_implementation=varlen without its CUDA kernel (needs a GPU and torch>=2.10): "
            "each document runs through SDPA on its own, correct but slow"
        )
    if name != "auto":
        return name
    return NAME if packing != "off" and has_kernel else "sdpa"


def register() -> None:
    """Make ``attn_implementation="varlen"`` loadable by ``from_pretrained``."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_attention_forward)


def doc_lengths(position_ids) -> list[int]:
    """Document lengths of a flattened batch: a document starts wherever a position is 0."""
    import torch

    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten().tolist() + [flat.numel()]
    if starts[0] != 0:  # a row that does not start at position 0 still starts a document
        starts.insert(0, 0)
    return [b - a for a, b in zip(starts[:-1], starts[1:], strict=True)]


def cu_seq_lens(lengths: list[int]):
    """Cumulative lengths ``[0, l0, l0 + l1, ...]`` as the int32 tensor flash kernels take."""
    import torch

    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    out[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    return out


@functools.cache
def _kernel_kwargs(scale: float | None, gqa: bool) -> tuple:
    """Keyword arguments for this torch's ``varlen_attn`` (its signature changed in 2.11)."""
    params = inspect.signature(kernel()).parameters
    kw = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    if scale is not None and "scale" in params:
        kw["scale"] = scale
    if gqa and "enable_gqa" in params:
        kw["enable_gqa"] = True
    return tuple(kw.items())


def _per_document(q, k, v, cu, scale):
    """The reference: causal SDPA on each document alone (q, k, v: tokens x heads x dim)."""
    import torch
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    out = torch.empty_like(q)
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        if b > a:
            t = (x[a:b].transpose(0, 1) for x in (q, k, v))
            o = sdpa(*t, is_causal=True, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
            out[a:b] = o.transpose(0, 1)
    return out


def varlen_attention_forward(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs
):
    """transformers attention function: (batch, heads, seq, dim) in, (batch, seq, heads, dim)
    out, each document of a packed row attending causally to itself only."""
    import torch

    if dropout:
        raise ValueError("varlen attention does not implement attention dropout; use sdpa")
    b, hq, n, d = query.shape
    cu, longest = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu is None:  # lengths not supplied by the collator: derive them (one sync per call)
        pos = kwargs.get("position_ids")  # (1, n) when the model made them: one per row
        lengths = doc_lengths(pos.expand(b, -1)) if pos is not None else [n] * b
        cu, longest = cu_seq_lens(lengths).to(query.device), max(lengths)
    q, k, v = (x.transpose(1, 2).reshape(b * n, x.shape[1], d) for x in (query, key, value))
    run = kernel()
    if run is None or q.device.type != "cuda":
        out = _per_document(q, k, v, cu.cpu(), scaling)
    else:
        dtype = q.dtype
        if dtype not in (torch.float16, torch.bfloat16):  # flash takes 16-bit inputs only
            q, k, v = (x.to(torch.bfloat16) for x in (q, k, v))
        cu = cu.to(device=q.device, dtype=torch.int32)
        kw = dict(_kernel_kwargs(scaling, hq != k.shape[1]))
        if hq != k.shape[1] and "enable_gqa" not in kw:  # a kernel without grouped heads
            k, v = (x.repeat_interleave(hq // x.shape[1], dim=1) for x in (k, v))
        out = run(q, k, v, cu, cu, int(longest), int(longest), **kw).to(dtype)
    return out.reshape(b, n, hq, d), None
