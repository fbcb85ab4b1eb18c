"""Gradient checkpointing whose saved layer inputs wait in pinned host memory.

A checkpointed decoder layer keeps one tensor for backward: its input (tokens x hidden, in
the compute dtype). Over a whole model that is what checkpointing costs: 2 GiB for 32 layers
of Llama-8B at 8,192 tokens a step, 2.5 GiB for 80 layers of Llama-70B at 2,048. Here each
input goes to pinned host memory on a side stream as soon as its layer has run (its GPU
memory is free again once the copy is done) and comes back on another side stream one layer
ahead of the backward that needs it, so both transfers overlap with compute: a layer's
input is a few tens of MB, its recompute and backward take milliseconds.

The recompute is the reentrant kind (an autograd Function that runs the layer again under
``enable_grad`` in its backward), with the RNG state of the forward restored (the same
dropout masks) and the forward's autocast state. transformers calls a checkpointed layer as
``layer._gradient_checkpointing_func(partial(forward, **kwargs), *args)``
(``transformers/modeling_layers.py``), so ``modeling.checkpoint_first_layers`` puts
:func:`checkpoint` there. Without CUDA the inputs are cloned instead (the same
autograd path, so the CPU tests check its gradients).
"""

from __future__ import annotations

import functools
import weakref


class _Streams:
    """The two copy streams, made once per device."""

    @staticmethod
    @functools.cache
    def get(device):
        import torch

        return torch.cuda.Stream(device), torch.cuda.Stream(device)


class _Stash:
    """One layer input: copied to host memory, later copied back ahead of its backward."""

    last: weakref.ref | None = None  # the stash made before this one: prefetched next

    def __init__(self, x):
        import torch

        self.device, self.gpu, self.ready = x.device, None, None
        self.prev = _Stash.last
        _Stash.last = weakref.ref(self)
        if x.device.type != "cuda":
            self.host, self.copied = x.detach().clone(), None
            return
        d2h, _ = _Streams.get(x.device)
        d2h.wait_stream(torch.cuda.current_stream(x.device))  # x is written by now
        self.host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        with torch.cuda.stream(d2h):
            self.host.copy_(x, non_blocking=True)
            self.copied = torch.cuda.Event()
            self.copied.record(d2h)
        x.record_stream(d2h)  # the allocator reuses x's memory only after the copy

    def prefetch(self) -> None:
        import torch

        if self.copied is None or self.gpu is not None or self.host is None:
            return
        _, h2d = _Streams.get(self.device)
        # Allocated in the compute stream's pool, where it is used and freed: a block the copy
        # stream allocated would go back to that stream's own pool (with expandable segments,
        # a segment of its own), reserved beside the compute stream's and never reused by it.
        stream = torch.cuda.current_stream(self.device)
        self.gpu = torch.empty(self.host.shape, dtype=self.host.dtype, device=self.device)
        h2d.wait_stream(stream)  # the block may be one that work queued there still reads
        h2d.wait_event(self.copied)
        with torch.cuda.stream(h2d):
            self.gpu.copy_(self.host, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(h2d)

    def fetch(self):
        """The input back on its device, for use on the current stream (once)."""
        import torch

        if self.copied is None:
            x, self.host = self.host, None
            return x
        self.prefetch()
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(self.ready)
        x, self.gpu, self.host = self.gpu, None, None
        prev = self.prev() if self.prev is not None else None
        if prev is not None:  # the layer before this one runs its backward next
            prev.prefetch()
        return x


def _autocast_state(device_type: str) -> dict:
    import torch

    return {
        "device_type": device_type,
        "enabled": torch.is_autocast_enabled(device_type),
        "dtype": torch.get_autocast_dtype(device_type),
        "cache_enabled": torch.is_autocast_cache_enabled(),
    }


def _checkpoint_function():
    import torch

    class OffloadedCheckpoint(torch.autograd.Function):
        @staticmethod
        def forward(ctx, run, _requires_grad, x, *args):
            ctx.run, ctx.args, ctx.x_requires_grad = run, args, x.requires_grad
            ctx.autocast = _autocast_state(x.device.type)
            ctx.cpu_rng = torch.get_rng_state()
            ctx.cuda_rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
            with torch.no_grad():
                out = run(x, *args)
            ctx.stash = _Stash(x)
            return out

        @staticmethod
        def backward(ctx, *grads):
            x = ctx.stash.fetch().detach().requires_grad_(ctx.x_requires_grad)
            devices = [x.device] if x.is_cuda else []
            with torch.random.fork_rng(devices=devices):
                torch.set_rng_state(ctx.cpu_rng)
                if ctx.cuda_rng is not None:
                    torch.cuda.set_rng_state(ctx.cuda_rng, x.device)
                with torch.enable_grad(), torch.autocast(**ctx.autocast):
                    out = ctx.run(x, *ctx.args)
            outs = out if isinstance(out, tuple) else (out,)
            pairs = [
                (o, g)
                for o, g in zip(outs, grads, strict=False)
                if isinstance(o, torch.Tensor) and o.requires_grad and g is not None
            ]
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
            grad_x = x.grad if ctx.x_requires_grad else None
            return (None, None, grad_x, *([None] * len(ctx.args)))

    return OffloadedCheckpoint


@functools.cache
def _function():
    return _checkpoint_function()


@functools.cache
def _requires_grad_token():
    """An empty tensor that requires grad: the Function's output then requires grad even when
    the layer's input does not (the first layer's, under frozen embeddings), so its backward,
    which computes the layer's LoRA gradients, runs."""
    import torch

    return torch.empty(0, requires_grad=True)


def checkpoint(run, x, *args):
    """Checkpoint ``run(x, *args)`` with ``x`` kept in host memory until backward.

    ``x`` is the layer's hidden state (the only input that may need a gradient); ``args`` are
    passed through as they are (their gradients, if any, are not computed: the same
    contract as reentrant checkpointing).
    """
    return _function().apply(run, _requires_grad_token(), x, *args)
