"""LoRA A inputs made again in backward: the same loss and gradients, less kept."""

from __future__ import annotations

import types

import pytest
import torch
from support.autograd import saved_bytes

from qlora_kfp.configs import TrainConfig
from qlora_kfp.training import autofit, lora_dropout, lora_inputs, modeling
from qlora_kfp.training.peft_model import build_peft_model

BOTH = (lora_inputs.SWIGLU, lora_inputs.NORMS)


def _model(quantized, dropout: float, checkpointed: int, marked: tuple[str, ...]):
    cfg = TrainConfig(lora_r=8, lora_dropout=dropout, fused_lora=True, fused_kernels="on")
    torch.manual_seed(0)
    model = build_peft_model(cfg, quantized.path)
    assert autofit.recomputed_lora_inputs(model.config, cfg) == BOTH
    torch.manual_seed(1)  # lora_B starts at zero: give it values so every gradient flows
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    modeling.checkpoint_first_layers(model, checkpointed)
    if marked:  # fused_kernels=False: transformers' own RMSNorm and activation (no Triton)
        assert lora_inputs.install(model, marked, False) == lora_inputs.expected(marked, 2)
    return model.train()


def _counting_recipes(monkeypatch) -> list[int]:
    """Counts the inputs made again in backward (every recipe marked is wrapped)."""
    made = [0]
    mark = lora_inputs.mark

    def counting(out, remake, *sources):
        def again(*a):
            made[0] += 1
            return remake(*a)

        return mark(out, again, *sources)

    monkeypatch.setattr(lora_inputs, "mark", counting)
    return made


@pytest.mark.parametrize(
    "model_type, act, liger, want",
    [
        pytest.param("llama", "silu", True, BOTH, id="llama-liger"),
        pytest.param("llama", "silu", False, (lora_inputs.SWIGLU,), id="llama-own-rmsnorm"),
        pytest.param("qwen2", "silu", True, BOTH, id="qwen2-liger"),
        pytest.param("gemma", "gelu_pytorch_tanh", True, (), id="gemma-gelu"),
        pytest.param("gemma2", "gelu_pytorch_tanh", True, (), id="gemma2-four-norms"),
        pytest.param("phi3", "silu", True, (), id="phi3-fused-gate-up"),
    ],
)
def test_what_is_made_again_follows_the_model_s_layout(model_type, act, liger, want):
    cfg = types.SimpleNamespace(model_type=model_type, hidden_act=act)
    assert lora_inputs.parts(cfg, liger_norms=liger) == want


@pytest.mark.parametrize(
    "dropout, checkpointed",
    [
        pytest.param(0.0, 0, id="no-dropout-kept"),
        pytest.param(0.1, 0, id="dropout-kept"),
        pytest.param(0.1, -1, id="dropout-every-layer-checkpointed"),
        pytest.param(0.0, 1, id="no-dropout-first-layer-checkpointed"),
    ],
)
def test_same_loss_and_gradients_as_keeping_the_inputs(
    quantized, batch, dropout, checkpointed, monkeypatch
):
    def loss_and_grads(marked: tuple[str, ...]):
        model = _model(quantized, dropout, checkpointed, marked)
        torch.manual_seed(2)  # the same dropout masks in both
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    want_loss, want = loss_and_grads(marked=())
    made = _counting_recipes(monkeypatch)
    got_loss, got = loss_and_grads(marked=BOTH)
    # Each layer's two norms and its SwiGLU ran again once (two layers): the first norm's
    # output for q, k and v together, the second's for gate and up.
    assert made[0] == 3 * 2
    assert torch.equal(got_loss, want_loss)
    assert want.keys() == got.keys() and all(g.abs().sum() > 0 for g in got.values())
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize(
    "dropout, which",
    [
        pytest.param(0.0, BOTH, id="norms-and-product"),
        pytest.param(0.1, BOTH, id="norms-and-product-dropout"),
        pytest.param(0.0, (lora_inputs.SWIGLU,), id="product-only"),
    ],
)
def test_what_is_made_again_is_no_longer_kept(quantized, batch, dropout, which):
    """What the forward keeps falls by exactly the marked outputs (the two norms' and the
    SwiGLU product of every layer, or the product alone); none of them is kept. float32:
    transformers' RMSNorm keeps its float32 input itself (in bf16 it keeps a float32 copy,
    so ``parts`` marks its output only where Liger's RMSNorm runs)."""
    made: list[torch.Tensor] = []

    def record(_module, _args, out):
        made.append(out)

    def forward(marked: tuple[str, ...]):
        model = _model(quantized, dropout, 0, marked)
        made.clear()
        layers = modeling.decoder_layers(model)
        hooks = [
            layer.mlp.down_proj.register_forward_pre_hook(lambda _m, a: made.append(a[0]))
            for layer in layers
        ]
        if lora_inputs.NORMS in which:
            hooks += [
                m.register_forward_hook(record)
                for layer in layers
                for m in (layer.input_layernorm, layer.post_attention_layernorm)
            ]
        torch.manual_seed(2)
        kept = saved_bytes(lambda: model(**batch).loss)
        for h in hooks:
            h.remove()
        return kept

    before = forward(marked=())
    freed = sum(t.untyped_storage().nbytes() for t in made)
    assert len(made) == lora_inputs.expected(which, 2)
    assert before - forward(marked=which) == freed


@pytest.mark.parametrize("p", [pytest.param(0.0, id="no-dropout"), pytest.param(0.3, id="dropout")])
def test_one_input_made_again_serves_every_linear_that_takes_it(p):
    """q, k and v's A products take one norm output: their backwards make it once, hold it
    until the last of them, then let it go; the gradients are those of keeping it."""
    norm = torch.nn.LayerNorm(8)
    values = torch.randn(5, 8)
    weights = [torch.randn(2, 8) for _ in range(3)]
    dropout = torch.nn.Dropout(p) if p else torch.nn.Identity()

    def run(marked: bool):
        calls = []
        h = values.clone().requires_grad_(True)
        x = norm(h)
        if marked:
            lora_inputs.mark(x, lambda t: calls.append(1) or norm(t), h)
        ws = [w.clone().requires_grad_(True) for w in weights]
        torch.manual_seed(3)
        outs = [lora_dropout.lora_a(dropout, x, w) for w in ws]
        remake = lora_inputs.recipe(x)[0]
        sum(o.square().sum() for o in outs).backward()
        return [w.grad for w in ws] + [h.grad], calls, remake

    want, _, _ = run(marked=False)
    got, calls, remake = run(marked=True)
    assert calls == [1] and remake.takers == 0 and remake.made is None
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_a_recipe_is_not_trusted_once_its_output_changed_in_place():
    gate, up = torch.randn(3, 8), torch.randn(3, 8)
    product = lora_inputs.mark(gate * up, torch.mul, gate, up)
    assert lora_inputs.recipe(product)[0].fn is torch.mul
    product.add_(1.0)
    assert lora_inputs.recipe(product) == (None, ())
    weight = torch.randn(2, 8, requires_grad=True)
    out = lora_dropout.lora_a(torch.nn.Identity(), product, weight)
    out.sum().backward()  # kept as it is now, not made again from gate and up
    torch.testing.assert_close(weight.grad, product.sum(0).expand(2, 8))


def test_install_wraps_once_and_again_after_the_trainer_rebinds_a_forward(quantized):
    model = _model(quantized, 0.0, 0, marked=BOTH)
    assert lora_inputs.install(model, BOTH, False) == 6  # nothing wrapped twice
    norm = modeling.decoder_layers(model)[0].input_layernorm
    calls = []
    inner = norm.forward.__closure__  # the marking wrapper's
    assert inner is not None and norm.forward is not type(norm).forward

    def counting(self, x):  # what Liger's patching does: a new forward bound to the module
        calls.append(1)
        return type(self).forward(self, x)

    norm.forward = types.MethodType(counting, norm)
    lora_inputs.install(model, BOTH, False)
    x = torch.randn(2, 3, norm.weight.shape[0])
    out = norm(x)
    assert calls == [1]
    remake, sources = lora_inputs.recipe(out)
    assert sources[0] is x and torch.equal(remake.fn(x), out)


def test_a_mark_does_not_keep_its_sources_alive():
    gate, up = torch.randn(3, 8), torch.randn(3, 8)
    product = lora_inputs.mark(gate * up, torch.mul, gate, up)
    del gate
    assert lora_inputs.recipe(product) == (None, ())


@pytest.mark.gpu
def test_gpu_liger_kernels_remake_their_outputs_bit_for_bit():
    """On the GPU, bf16: Liger's SwiGLU and RMSNorm, made again in backward, give A the
    same gradient and x the same gradient as keeping their outputs."""
    from liger_kernel.ops import LigerSiLUMulFunction
    from liger_kernel.transformers.rms_norm import LigerRMSNorm

    torch.manual_seed(0)
    dev, bf16 = "cuda", torch.bfloat16
    values = torch.randn(2, 2, 512, 1024, device=dev, dtype=bf16)
    norm = LigerRMSNorm(1024).to(dev, bf16)
    weight = torch.randn(64, 1024, device=dev) * 0.02

    def run(marked: bool, which: str):
        # Fresh inputs each run: Liger's SwiGLU backward writes its gradients over the
        # tensors it kept (in a model, the gate and up activations of that step).
        gate, up = (v.clone().requires_grad_(True) for v in values)
        w = weight.clone().requires_grad_(True)
        if which == "swiglu":
            x = LigerSiLUMulFunction.apply(gate, up)
            remake, sources = LigerSiLUMulFunction.apply, (gate, up)
        else:
            x = norm(gate)
            remake, sources = norm.forward, (gate,)
        if marked:
            lora_inputs.mark(x, remake, *sources)
        with torch.autocast("cuda", dtype=bf16):
            out = lora_dropout.lora_a(torch.nn.Identity(), x, w)
        out.float().square().sum().backward()
        return w.grad, gate.grad

    for which in ("swiglu", "norm"):
        want, got = run(False, which), run(True, which)
        for w, g in zip(want, got, strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=0, msg=which)


@pytest.mark.slow
def test_the_train_stage_marks_after_the_trainer_applies_liger(
    quantized, prepared, tmp_path, monkeypatch
):
    """``Trainer.train`` applies Liger's kernels, rebinding the norms' and MLPs' forwards,
    before the first step: marks put in before that are gone (on the GPU, session 14, nothing
    was made again). Here a stand-in rebinds them as Liger's instance patching does."""
    import transformers.trainer

    from qlora_kfp.stages.train import run_train

    def like_liger(model, _config):
        for layer in modeling.decoder_layers(model):
            for m in (layer.input_layernorm, layer.post_attention_layernorm, layer.mlp):
                m.forward = types.MethodType(type(m).forward, m)

    monkeypatch.setattr(transformers.trainer, "apply_liger_kernel", like_liger)
    # Liger's SwiGLU is Triton-only; the model's own activation stands in for it.
    monkeypatch.setattr(lora_inputs, "_swiglu", lambda mlp, _fused: lambda g, u: mlp.act_fn(g) * u)
    made_again = []
    lora_a = lora_dropout.lora_a

    def spy(dropout, x, weight):
        if torch.is_grad_enabled():
            made_again.append(lora_inputs.recipe(x)[0] is not None)
        return lora_a(dropout, x, weight)

    monkeypatch.setattr(lora_dropout, "lora_a", spy)
    cfg = TrainConfig(
        max_steps=1, batch_size=2, lora_r=8, lora_dropout=0.0, fused_kernels="on", eval_steps=0
    )
    run_train(cfg, quantized.path, prepared.path, str(tmp_path / "out"))
    # Six of a layer's seven Linears (o takes the attention output, kept by attention).
    assert made_again and sum(made_again) * 7 == 6 * len(made_again)


def test_fewer_marks_than_the_plan_counted_on_is_a_warning(quantized, caplog):
    """The memory plan took the marked tensors off every layer: a layer whose MLP cannot be
    marked (here its activation is not the SiLU the plan assumed) says so in the task log."""
    import logging

    model = _model(quantized, 0.0, 0, marked=())
    mlp = modeling.decoder_layers(model)[1].mlp
    mlp.config = types.SimpleNamespace(hidden_act="gelu")
    hook = lora_inputs.callback(model, BOTH, False)
    with caplog.at_level(logging.WARNING, logger="qlora_kfp"):
        hook.on_train_begin(None, None, None)
    assert "only 5 of the 6 norms and MLPs the memory plan counted on" in caplog.text
