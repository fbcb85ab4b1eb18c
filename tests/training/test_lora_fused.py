"""The fused LoRA update (one addmm) computes what peft's forward computes, gradients too."""

from __future__ import annotations

import torch

from qlora_kfp.configs import TrainConfig
from qlora_kfp.training import lora_fused
from qlora_kfp.training.peft_model import build_peft_model


def _model(quantized, fused: bool, **cfg):
    cfg = TrainConfig(lora_r=8, lora_dropout=0.1, fused_lora=fused, **cfg)
    torch.manual_seed(0)
    model = build_peft_model(cfg, quantized.path)
    torch.manual_seed(1)  # lora_B starts at zero: give it values so the update is not zero
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    return model


def _loss_and_grads(model, batch):
    torch.manual_seed(2)  # the same dropout masks for both models
    model.train()
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_fused_update_gives_peft_loss_and_gradients_with_dropout(quantized, batch):
    peft_model, fused = _model(quantized, False), _model(quantized, True)
    n_lora = sum(1 for n, _ in fused.named_modules() if n.endswith("q_proj"))
    assert n_lora == 2  # two layers; every adapted Linear of them is fused
    assert sum(hasattr(m, "_peft_forward") for m in fused.modules()) == 7 * n_lora

    def not_called(*a, **k):
        raise AssertionError("the fused layer fell back to peft's forward")

    for m in fused.modules():
        if hasattr(m, "_peft_forward"):
            m._peft_forward = not_called
    want_loss, want = _loss_and_grads(peft_model, batch)
    got_loss, got = _loss_and_grads(fused, batch)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    assert want.keys() == got.keys() and any(g.abs().sum() > 0 for g in got.values())
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fused_update_defers_to_peft_where_it_does_not_apply(quantized, batch):
    fused = _model(quantized, True)
    with torch.no_grad():
        fused.eval()
        tuned = fused(**batch).logits
        with fused.disable_adapter():  # adapters off: the base model's logits
            base = fused(**batch).logits
    assert not torch.allclose(tuned, base, atol=1e-3)
    plain = _model(quantized, False)
    with torch.no_grad(), plain.disable_adapter():
        torch.testing.assert_close(base, plain.eval()(**batch).logits)


def test_dora_layers_keep_peft_forward(quantized, batch):
    dora = _model(quantized, True, use_dora=True)
    plain = _model(quantized, False, use_dora=True)
    with torch.no_grad():
        torch.testing.assert_close(
            dora.eval()(**batch).logits, plain.eval()(**batch).logits, rtol=1e-5, atol=1e-5
        )


def test_fusing_twice_changes_nothing(quantized):
    model = _model(quantized, True)
    assert lora_fused.fuse_lora_updates(model) == 0
