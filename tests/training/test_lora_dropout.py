"""LoRA dropout with the mask drawn again in backward: peft's values and gradients, less kept."""

from __future__ import annotations

import pytest
import torch
from support.autograd import saved_bytes

from qlora_kfp.training import lora_dropout


def _peft_path(x, weight, p):
    """What peft computes: ``lora_A(nn.Dropout(p)(x))``."""
    return torch.nn.functional.linear(torch.nn.Dropout(p)(x), weight)


def _run(fn, x, weight, seed: int):
    x = x.detach().clone().requires_grad_(x.requires_grad)
    weight = weight.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    out = fn(x, weight)
    grad = torch.randn_like(out, generator=torch.Generator(out.device).manual_seed(seed + 1))
    out.backward(grad)
    return out.detach(), x.grad, weight.grad


@pytest.mark.parametrize(
    "shape, p, input_grad",
    [
        pytest.param((6, 16), 0.1, True, id="2d-p0.1"),
        pytest.param((2, 5, 16), 0.1, True, id="3d-batch-p0.1"),
        pytest.param((2, 5, 16), 0.5, True, id="3d-p0.5"),
        pytest.param((3, 16), 0.05, False, id="input-needs-no-grad"),
    ],
)
def test_same_values_and_gradients_as_peft(shape, p, input_grad):
    x = torch.randn(*shape, requires_grad=input_grad)
    weight = torch.randn(4, shape[-1])
    drop = torch.nn.Dropout(p)
    want = _run(lambda a, w: _peft_path(a, w, p), x, weight, seed=3)
    got = _run(lambda a, w: lora_dropout.lora_a(drop, a, w), x, weight, seed=3)
    for name, w, g in zip(("output", "input grad", "weight grad"), want, got, strict=True):
        if w is None:
            assert g is None, name
        else:
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6, msg=name)


def test_the_rng_stream_after_it_is_what_peft_leaves():
    """The same draws as nn.Dropout: the next random number is the same in both paths."""
    x, weight = torch.randn(4, 8), torch.randn(2, 8)
    torch.manual_seed(5)
    _peft_path(x, weight, 0.2)
    want = torch.rand(1)
    torch.manual_seed(5)
    lora_dropout.lora_a(torch.nn.Dropout(0.2), x.requires_grad_(), weight.requires_grad_())
    assert torch.equal(torch.rand(1), want)


def test_keeps_only_the_input_where_peft_keeps_a_dropped_copy_and_a_mask_per_linear():
    """q, k and v share one input: peft keeps three dropped copies and masks, this one x."""
    x = torch.randn(64, 256, requires_grad=True)
    weights = [torch.randn(8, 256, requires_grad=True) for _ in range(3)]
    drop = torch.nn.Dropout(0.1)

    def ours():
        return [lora_dropout.lora_a(drop, x, w) for w in weights]

    def peft():
        return [torch.nn.functional.linear(drop(x), w) for w in weights]

    x_bytes, w_bytes = x.numel() * 4, 3 * weights[0].numel() * 4
    assert saved_bytes(ours) == x_bytes + w_bytes
    # Each of the three keeps a float32 copy and a one-byte mask.
    assert saved_bytes(peft) >= 3 * (x_bytes + x.numel()) + w_bytes


@pytest.mark.parametrize(
    "module", [torch.nn.Identity(), torch.nn.Dropout(0.0)], ids=["identity", "p-zero"]
)
def test_no_dropout_is_a_plain_matmul(module):
    x, weight = torch.randn(3, 8), torch.randn(2, 8)
    torch.testing.assert_close(lora_dropout.lora_a(module, x, weight), x @ weight.t())


def test_eval_mode_drops_nothing():
    drop = torch.nn.Dropout(0.5).eval()
    x, weight = torch.randn(3, 8), torch.randn(2, 8)
    torch.testing.assert_close(lora_dropout.lora_a(drop, x, weight), x @ weight.t())


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 4096), (2, 2048, 1024)], ids=["2d", "3d"])
def test_gpu_bf16_autocast_matches_peft_bit_for_bit_masks(shape):
    """On the GPU, under bf16 autocast as the Trainer runs it: the regenerated mask is the
    forward's (CUDA's fused dropout kernel from the same Philox state), so the output and
    both gradients equal peft's path to bf16 rounding of the same operations."""
    x = torch.randn(*shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(64, shape[-1], device="cuda") * 0.02  # float32, as peft keeps LoRA A
    drop = torch.nn.Dropout(0.1)

    def under_autocast(fn):
        def run(a, w):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return fn(a, w)

        return run

    want = _run(under_autocast(lambda a, w: _peft_path(a, w, 0.1)), x, weight, seed=7)
    got = _run(under_autocast(lambda a, w: lora_dropout.lora_a(drop, a, w)), x, weight, seed=7)
    for name, w, g in zip(("output", "input grad", "weight grad"), want, got, strict=True):
        assert g.dtype == w.dtype, name
        torch.testing.assert_close(g, w, rtol=0, atol=0, msg=name)
