"""Gradient checkpointing layer by layer: which layers recompute, and that nothing else changes."""

from __future__ import annotations

import pytest
import torch

from qlora_kfp.configs import TrainConfig
from qlora_kfp.errors import ConfigError
from qlora_kfp.training.peft_model import build_peft_model


def _attention_calls(model_fn):
    """Run ``model_fn`` and count the calls of each layer's attention module by layer index.

    A checkpointed layer's recompute calls ``forward`` itself (hooks on the decoder layer do not
    fire) but its attention module again through ``__call__``: two calls a step instead of one.
    """
    from transformers.models.llama.modeling_llama import LlamaAttention

    calls: dict[int, int] = {}

    def hook(module, args, output):
        if isinstance(module, LlamaAttention):
            calls[module.layer_idx] = calls.get(module.layer_idx, 0) + 1

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        result = model_fn()
    finally:
        handle.remove()
    return calls, result


def apply_plan(model, cfg: TrainConfig, model_dir: str):
    """Give ``model`` the checkpointing the train stage would plan for ``cfg`` (counts and
    offload as set: the budget plays no part) the way the train stage does."""
    from transformers import AutoConfig

    from qlora_kfp.training import autofit

    model_cfg = AutoConfig.from_pretrained(model_dir)
    plan = autofit.plan(model_cfg, cfg, 64, cfg.gpu_memory_gib, float("inf"), has_varlen=None)
    autofit.apply(model, plan.chosen)


def _step(quantized, batch, layers: int, offload: str = "off"):
    cfg = TrainConfig(
        lora_r=8,
        lora_dropout=0.1,
        gradient_checkpointing_layers=layers,
        gradient_checkpointing_offload=offload,
    )
    torch.manual_seed(0)
    model = build_peft_model(cfg, quantized.path)
    apply_plan(model, cfg, quantized.path)
    torch.manual_seed(1)  # lora_B starts at zero: give it values so every gradient is nonzero
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    model.train()

    def step():
        torch.manual_seed(2)  # the same dropout masks in every run
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    return _attention_calls(step)


@pytest.mark.parametrize(
    "layers, calls",
    [
        pytest.param(-1, {0: 2, 1: 2}, id="all-layers-recompute"),
        pytest.param(1, {0: 2, 1: 1}, id="first-layer-only"),
        pytest.param(5, {0: 2, 1: 2}, id="more-than-the-model-has"),
        pytest.param(0, {0: 1, 1: 1}, id="none"),
    ],
)
def test_only_the_first_layers_recompute_and_the_gradients_do_not_change(
    quantized, batch, layers, calls
):
    want_calls, (want_loss, want) = _step(quantized, batch, -1)
    got_calls, (got_loss, got) = _step(quantized, batch, layers)
    assert got_calls == calls and want_calls == {0: 2, 1: 2}
    # The recompute replays the same dropout masks (checkpoint restores the RNG state).
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    assert want.keys() == got.keys() and all(g.abs().sum() > 0 for g in got.values())
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.slow
def test_the_train_stage_keeps_the_choice_through_the_trainer(quantized, prepared, tmp_path):
    """The Trainer's own checkpointing switch would turn recompute back on in every layer."""
    from qlora_kfp.stages.train import run_train

    cfg = TrainConfig(
        lora_r=8, max_steps=3, batch_size=4, gradient_checkpointing_layers=1, checkpoint_steps=0
    )
    calls, res = _attention_calls(
        lambda: run_train(cfg, quantized.path, prepared.path, str(tmp_path / "adapter"))
    )
    assert res.metrics["steps"] == 3
    # Evaluation calls both layers alike; training recomputes only the first layer, once a step.
    assert calls[0] - calls[1] == 3


@pytest.mark.parametrize(
    "layers, calls",
    [
        pytest.param(-1, {0: 2, 1: 2}, id="all-layers-offloaded"),
        pytest.param(1, {0: 2, 1: 1}, id="first-layer-offloaded"),
    ],
)
def test_offloaded_inputs_give_the_same_loss_and_gradients(quantized, batch, layers, calls):
    """Inputs kept off the device (cloned on the CPU, the same autograd path as the pinned
    copies on a GPU): the same recompute, the same dropout masks, the same gradients."""
    want_calls, (want_loss, want) = _step(quantized, batch, layers)
    got_calls, (got_loss, got) = _step(quantized, batch, layers, offload="on")
    assert got_calls == want_calls == calls
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    assert want.keys() == got.keys() and all(g.abs().sum() > 0 for g in got.values())
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)


def test_offloaded_checkpoint_of_a_layer_whose_input_needs_no_grad():
    """The first layer's input (frozen embeddings) needs no gradient; its LoRA weights do."""
    from qlora_kfp.training import offload

    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(3, 4)
    offload.checkpoint(lambda t: torch.nn.functional.gelu(lin(t)), x).sum().backward()
    got = lin.weight.grad.clone()
    lin.weight.grad = None
    torch.nn.functional.gelu(lin(x)).sum().backward()
    torch.testing.assert_close(got, lin.weight.grad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_offloaded_inputs_come_back_into_the_compute_stream_s_memory():
    """The inputs copied back ahead of their backward are allocated where they are used: a
    block the copy stream allocated stays in that stream's pool (its own segment), reserved
    beside the compute stream's and never reused by a step. Same gradients as keeping them."""
    from qlora_kfp.training import offload

    torch.manual_seed(0)
    layers = [torch.nn.Linear(1024, 1024, device="cuda") for _ in range(4)]
    x = torch.randn(4096, 1024, device="cuda", requires_grad=True)

    def run(offloaded: bool):
        h = x
        for lin in layers:
            h = offload.checkpoint(lin, h) if offloaded else lin(h)
        h.square().mean().backward()
        grads = [x.grad.clone()] + [lin.weight.grad.clone() for lin in layers]
        for t in [x] + [lin.weight for lin in layers]:
            t.grad = None
        return grads

    want = run(offloaded=False)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    got = run(offloaded=True)
    torch.cuda.synchronize()
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    here = torch.cuda.current_stream().cuda_stream
    streams = {seg["stream"] for seg in torch.cuda.memory_snapshot()}
    assert streams == {here}


@pytest.mark.parametrize(
    "value, count",
    [
        pytest.param("auto", None, id="auto"),
        pytest.param("-1", -1, id="all-as-text"),
        pytest.param(-1, -1, id="all-as-a-number"),
        pytest.param("12", 12, id="a-count"),
        pytest.param(0, 0, id="none"),
    ],
)
def test_layer_counts_read_from_text_or_numbers(value, count):
    assert TrainConfig(gradient_checkpointing_layers=value).checkpointed_layers == count


@pytest.mark.parametrize("value", [-2, "-2", "all", "1.5"], ids=["-2", "-2-text", "word", "float"])
def test_a_layer_count_that_is_not_auto_or_a_count_is_refused(value):
    with pytest.raises(ConfigError, match="gradient_checkpointing_layers"):
        TrainConfig(gradient_checkpointing_layers=value)
