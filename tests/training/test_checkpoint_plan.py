"""One checkpointing decision: the preflight and the train stage plan the same.

``gradient_checkpointing_layers`` (a count, -1 for every layer, or ``auto``) and
``gradient_checkpointing_offload`` (on, off, auto) become a plan: how many decoder layers,
counted from the first, recompute their activations, whether their inputs wait in host memory,
and (``auto``) the settings to fall back to when the first steps run out of memory.

The decision as the code makes it (pinned by the table below):

* checkpointing off: no layer, no offload, no fallback;
* a count (-1: every layer; more than the model has: every layer): that many, offloaded only
  with ``offload=on`` (``auto`` with a count does not offload), no fallback;
* ``auto``: the fewest layers whose estimate fits 0.95 x the budget (the smaller of the GPU's
  free memory and ``gpu_memory_gib``), offloading only when that saves a layer and is allowed
  (``on``; ``auto`` when the inputs fit half the host's free memory); nothing fits: every
  layer, offloaded where allowed. Then fallbacks with more layers (halfway, then every layer);
  with several processes none (one rank cannot start over alone).

The preflight plans before any GPU is claimed, in a pod without one, for the train stage's
GPU image (the varlen kernel) with no host limit known; the train stage plans on its GPU. Given
the same model, settings, rows, budget and host memory, both must plan the same.
"""

from __future__ import annotations

import contextlib
import logging
import re

import pytest
import torch
from transformers import LlamaConfig

from qlora_kfp.configs import TrainConfig
from qlora_kfp.errors import ConfigError

SHAPE_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
)
SEQ = 2048
UNLIMITED = 1e6  # GiB of host memory: offload is never refused for room
BINS = dict(packing="bins", pack_length=SEQ)


def case(id, want, layers=32, host=UNLIMITED, **kw):
    """``want``: the settings to try, best first, as (layers checkpointed, offloaded)."""
    return pytest.param(kw, layers, host, want, id=id)


CASES = [
    # Checkpointing off.
    case("checkpointing-off", [(0, False)], gradient_checkpointing=False),
    case(
        "checkpointing-off-ignores-a-count-and-offload",
        [(0, False)],
        gradient_checkpointing=False,
        gradient_checkpointing_layers="8",
        gradient_checkpointing_offload="on",
    ),
    # A count: kept as given, no fallback.
    case("minus-one-is-every-layer", [(32, False)], gradient_checkpointing_layers="-1"),
    case(
        "every-layer-offloaded",
        [(32, True)],
        gradient_checkpointing_layers="-1",
        gradient_checkpointing_offload="on",
    ),
    case(
        "every-layer-offload-off",
        [(32, False)],
        gradient_checkpointing_layers="-1",
        gradient_checkpointing_offload="off",
    ),
    case(
        "eight-of-32-offload-auto-keeps-inputs-on-gpu",
        [(8, False)],
        gradient_checkpointing_layers="8",
    ),
    case(
        "eight-of-32-offloaded",
        [(8, True)],
        gradient_checkpointing_layers="8",
        gradient_checkpointing_offload="on",
    ),
    case(
        "eight-of-32-offload-on-without-host-room",
        [(8, True)],
        host=1.0,
        gradient_checkpointing_layers="8",
        gradient_checkpointing_offload="on",
    ),
    case("zero-layers", [(0, False)], gradient_checkpointing_layers="0"),
    case(
        "zero-layers-offload-on-offloads-nothing",
        [(0, False)],
        gradient_checkpointing_layers="0",
        gradient_checkpointing_offload="on",
    ),
    case("more-than-the-model-has", [(32, False)], gradient_checkpointing_layers="40"),
    case("three-of-8", [(3, False)], layers=8, gradient_checkpointing_layers="3"),
    # auto: the fewest that fit, then fallbacks.
    case("auto-default-80-gib", [(0, False), (16, True), (32, True)]),
    case("auto-40-gib", [(0, False), (16, True), (32, True)], gpu_memory_gib=40.0),
    case("auto-24-gib", [(15, True), (24, True), (32, True)], gpu_memory_gib=24.0),
    case(
        "auto-24-gib-offload-on",
        [(15, True), (24, True), (32, True)],
        gpu_memory_gib=24.0,
        gradient_checkpointing_offload="on",
    ),
    case(
        "auto-24-gib-offload-off",
        [(16, False), (24, False), (32, False)],
        gpu_memory_gib=24.0,
        gradient_checkpointing_offload="off",
    ),
    case(
        "auto-24-gib-host-lacks-room",
        [(16, False), (24, False), (32, False)],
        host=1.0,
        gpu_memory_gib=24.0,
    ),
    case(
        "auto-12-gib-29-of-32-offloaded",
        [(29, True), (31, True), (32, True)],
        gpu_memory_gib=12.0,
    ),
    case(
        "auto-12-gib-offload-off-31-of-32",
        [(31, False), (32, False)],
        gpu_memory_gib=12.0,
        gradient_checkpointing_offload="off",
    ),
    case("auto-8-gib-nothing-fits-every-layer-offloaded", [(32, True)], gpu_memory_gib=8.0),
    case("auto-two-processes-no-fallback", [(15, True)], gpu_memory_gib=24.0, num_processes=2),
    case("auto-8-layers-12-gib", [(1, False), (5, True), (8, True)], layers=8, gpu_memory_gib=12.0),
    case("auto-8-layers-7-gib", [(7, False), (8, True)], layers=8, gpu_memory_gib=7.0),
    # Every layer fits without offloading, and offloading fits no fewer (one layer not
    # checkpointed keeps more than the inputs offloading moves, which few layers allow);
    # peft's own LoRA forward, whose layers keep the LoRA inputs (lora_inputs).
    case(
        "auto-3-layers-6.3-gib-every-layer-then-offloaded",
        [(3, False), (3, True)],
        layers=3,
        gpu_memory_gib=6.3,
        fused_lora=False,
    ),
    # The preflight (no GPU, so no varlen kernel) planned with sdpa's attention mask: at this
    # budget 15 layers checkpointed and kept on the GPU where the train stage checkpoints 14
    # and offloads them.
    case(
        "auto-between-two-counts-24.65-gib",
        [(14, True), (23, True), (32, True)],
        gpu_memory_gib=24.65,
    ),
    case(
        "auto-padded-rows-20-gib",
        [(20, True), (26, True), (32, True)],
        gpu_memory_gib=20.0,
        packing="padding_free",
    ),
]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Folders holding only an 8B-shaped ``config.json`` with 32, 8 or 3 layers."""
    root = tmp_path_factory.mktemp("configs")
    for n in (32, 8, 3):
        LlamaConfig(**SHAPE_8B, num_hidden_layers=n).save_pretrained(root / str(n))
    return {n: str(root / str(n)) for n in (32, 8, 3)}


def _cfg(kw: dict) -> TrainConfig:
    return TrainConfig(**{**BINS, "num_processes": 1, **kw})


def _pairs(settings) -> list[tuple[int, bool]]:
    return [(s.layers, s.offload) for s in settings]


def train_stage_plan(monkeypatch, cfg, model_dir, host) -> list[tuple[int, bool]]:
    """The train stage's settings on its GPU (varlen kernel), budget ``gpu_memory_gib``."""
    from qlora_kfp.training import attention, autofit, memory_fit, modeling

    monkeypatch.setattr(attention, "kernel", lambda: object())
    monkeypatch.setattr(modeling, "device", lambda: "cuda")
    monkeypatch.setattr(autofit, "host_available_gib", lambda: host * cfg.num_processes)
    rows = [{"input_ids": [1] * SEQ}]  # the longest row is max_seq_length long
    capacity = (cfg.pack_length or SEQ) if cfg.packing == "bins" else 0
    plan = memory_fit.memory_settings(cfg, model_dir, rows, capacity, cfg.gpu_memory_gib)
    return _pairs(plan.settings)


def preflight_plan(monkeypatch, caplog, cfg, model_dir) -> tuple[int, bool]:
    """The setting the preflight reports, in its pod without a GPU."""
    from qlora_kfp import preflight
    from qlora_kfp.training import attention

    monkeypatch.setattr(attention, "kernel", lambda: None)
    caplog.clear()
    # Settings that do not fit raise, after the setting has been reported.
    with caplog.at_level(logging.INFO, logger="qlora_kfp"), contextlib.suppress(ConfigError):
        preflight.check_memory(model_dir, cfg, SEQ, cfg.gpu_memory_gib)
    found = re.findall(
        r"with (\d+) of \d+ layers checkpointed( with their inputs in host memory)?:", caplog.text
    )
    assert len(found) == 1, caplog.text
    return int(found[0][0]), bool(found[0][1])


@pytest.mark.parametrize("kw, layers, host, want", CASES)
def test_the_train_stage_plans_as_pinned(monkeypatch, model_dirs, kw, layers, host, want):
    assert train_stage_plan(monkeypatch, _cfg(kw), model_dirs[layers], host) == want


@pytest.mark.parametrize("kw, layers, host, want", [c for c in CASES if c.values[2] == UNLIMITED])
def test_the_preflight_plans_what_the_train_stage_plans(
    monkeypatch, caplog, model_dirs, kw, layers, host, want
):
    cfg = _cfg(kw)
    got = preflight_plan(monkeypatch, caplog, cfg, model_dirs[layers])
    assert got == train_stage_plan(monkeypatch, cfg, model_dirs[layers], host)[0] == want[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    "layers, offload, want",
    [
        pytest.param("0", "off", 0, id="none-of-2"),
        pytest.param("1", "off", 1, id="first-of-2"),
        pytest.param("1", "on", 1, id="first-of-2-offloaded"),
        pytest.param("-1", "off", 2, id="every-layer"),
        pytest.param("auto", "auto", None, id="auto"),
    ],
)
def test_the_train_stage_applies_its_plan_once(
    quantized, prepared, tmp_path, monkeypatch, layers, offload, want
):
    """On the tiny model (2 layers): the plan reaches the model once, and exactly its first
    layers recompute, each once a step (a layer recomputes when its attention runs more often
    than the layer itself: the recompute calls ``forward`` inside the checkpoint, where the
    layer's hooks do not fire)."""
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaDecoderLayer

    from qlora_kfp.stages.train import run_train
    from qlora_kfp.training import modeling
    from qlora_kfp.training import offload as offloading

    applied = []
    real = modeling.checkpoint_first_layers

    def spy(model, n, offload=False):
        applied.append((model, n, offload))
        return real(model, n, offload)

    monkeypatch.setattr(modeling, "checkpoint_first_layers", spy)
    layer_calls: dict[int, int] = {}
    attention_calls: dict[int, int] = {}

    def hook(module, args, output):
        if isinstance(module, LlamaDecoderLayer):
            i = module.self_attn.layer_idx
            layer_calls[i] = layer_calls.get(i, 0) + 1
        elif isinstance(module, LlamaAttention):
            attention_calls[module.layer_idx] = attention_calls.get(module.layer_idx, 0) + 1

    steps = 2
    cfg = TrainConfig(
        lora_r=8,
        max_steps=steps,
        batch_size=4,
        checkpoint_steps=0,
        gradient_checkpointing_layers=layers,
        gradient_checkpointing_offload=offload,
    )
    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        res = run_train(cfg, quantized.path, prepared.path, str(tmp_path / "adapter"))
    finally:
        handle.remove()

    m = res.metrics
    planned = m["checkpointed_layers"]
    if want is not None:
        assert planned == want
    assert len(applied) == 1, "the plan is applied once, by the train stage"
    model, n, offloaded = applied[0]
    assert (n, offloaded) == (planned, bool(m["checkpoint_offload"]))
    recomputes = {i: attention_calls[i] - layer_calls[i] for i in layer_calls}
    assert len(recomputes) == 2
    assert recomputes == {i: steps if i < planned else 0 for i in range(2)}
    wrapped = [layer for layer in modeling.decoder_layers(model) if layer.gradient_checkpointing]
    assert len(wrapped) == planned
    offload_func = offloading.checkpoint
    assert all(
        (layer._gradient_checkpointing_func is offload_func) == offloaded for layer in wrapped
    )
