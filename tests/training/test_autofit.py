"""``auto`` memory settings: the choice from the estimate, and the restart after running out."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from qlora_kfp.configs import TrainConfig
from qlora_kfp.errors import ConfigError
from qlora_kfp.training import autofit, memory

LLAMA_8B = LlamaConfig(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
)
BINS = dict(packing="bins", pack_length=2048, lora_r=64, lora_dropout=0.0)


def _plan(budget: float, host: float = 1e6, **kw) -> tuple[autofit.Setting, ...]:
    cfg = TrainConfig(**{**BINS, **kw})
    return autofit.plan(LLAMA_8B, cfg, 2048, budget, host, has_varlen=None).settings


@pytest.mark.parametrize(
    "budget, layers, offload",
    [
        pytest.param(141.0, 0, False, id="h200-nothing-recomputes"),
        pytest.param(80.0, 0, False, id="h100-4-bins-fit-without-checkpointing"),
        pytest.param(40.0, None, None, id="40gb-some-layers-checkpointed"),
        pytest.param(12.0, 31, True, id="12gb-31-of-32-layers-offloaded"),
        pytest.param(11.3, 32, True, id="11.3gb-every-layer-offloaded"),
    ],
)
def test_auto_takes_the_fewest_checkpointed_layers_that_fit(budget, layers, offload):
    first = _plan(budget)[0]
    if offload is not None:
        assert first.offload == offload
    if layers is not None:
        assert first.layers == layers
    assert first.estimate_gib <= autofit.MARGIN * budget
    if first.layers > 0:  # one layer fewer would not fit
        fewer = memory.estimate(
            LLAMA_8B,
            2048,
            4,
            64,
            packing="bins",
            attention="varlen",
            fp32_upcast=False,
            gradient_checkpointing_layers=first.layers - 1,
            offload=True,
        )
        assert fewer.total_gib > autofit.MARGIN * budget


@pytest.mark.parametrize("budget", [14.0, 18.0, 22.0, 26.0, 30.0, 34.0, 38.0])
def test_offload_only_when_it_buys_a_layer(budget):
    first = _plan(budget)[0]
    plain = _plan(budget, gradient_checkpointing_offload="off")[0]
    if first.offload:
        assert first.layers < plain.layers
    else:
        assert first == plain


def test_no_offload_when_the_host_lacks_room():
    first = _plan(20.0, host=1.0)[0]
    assert not first.offload and _plan(20.0)[0].offload
    assert first.layers > _plan(20.0)[0].layers  # more recompute instead


def test_fallbacks_need_less_memory_and_end_with_every_layer():
    plan = _plan(20.0)
    assert [s.layers for s in plan] == sorted(s.layers for s in plan)
    assert len({s.layers for s in plan}) == len(plan)
    assert plan[-1].layers == 32 and plan[-1].offload
    assert [s.estimate_gib for s in plan] == sorted((s.estimate_gib for s in plan), reverse=True)


@pytest.mark.parametrize(
    "kw, want",
    [
        pytest.param({"gradient_checkpointing_layers": "-1"}, [(32, False)], id="all"),
        pytest.param({"gradient_checkpointing_layers": "8"}, [(8, False)], id="eight"),
        pytest.param(
            {"gradient_checkpointing_layers": "8", "gradient_checkpointing_offload": "on"},
            [(8, True)],
            id="eight-offloaded",
        ),
        pytest.param({"gradient_checkpointing": False}, [(0, False)], id="off"),
    ],
)
def test_explicit_settings_are_kept_with_no_fallback(kw, want):
    assert [(s.layers, s.offload) for s in _plan(12.0, **kw)] == want


def test_offload_off_is_respected_by_auto():
    plan = _plan(20.0, gradient_checkpointing_offload="off")
    assert not any(s.offload for s in plan)


class _Run:
    """A training run that runs out of memory in the attempts given, after ``steps`` steps."""

    def __init__(self, failing: set[int], steps: int = 1, error=None):
        self.failing, self.steps, self.error = failing, steps, error
        self.attempts, self.applied, self.restarts = 0, [], 0

    def start(self):
        self.attempts += 1
        if self.attempts in self.failing:
            raise self.error or torch.OutOfMemoryError("CUDA out of memory. Tried to allocate")
        return "trained"

    def restart(self):
        self.restarts += 1


SETTINGS = [
    autofit.Setting(0, False, 70.0),
    autofit.Setting(16, True, 40.0),
    autofit.Setting(32, True, 12.0),
]


def _fit(run: _Run, settings=SETTINGS):
    return autofit.train_fitting(
        settings, run.applied.append, run.start, run.restart, lambda: run.steps, 32
    )


def test_out_of_memory_at_the_first_steps_restarts_with_the_next_setting():
    run = _Run(failing={1})
    result, used = _fit(run)
    assert (result, used) == ("trained", SETTINGS[1])
    assert run.applied == SETTINGS[:2] and run.restarts == 1


def test_every_setting_tried_then_a_one_line_error():
    run = _Run(failing={1, 2, 3})
    with pytest.raises(ConfigError, match=r"ran out of GPU memory at step 2 with 32 of 32") as e:
        _fit(run)
    assert "\n" not in str(e.value) and run.restarts == 2


def test_out_of_memory_late_in_training_is_not_retried():
    run = _Run(failing={1}, steps=autofit.FALLBACK_STEPS + 1)
    with pytest.raises(ConfigError, match="at step 12"):
        _fit(run)
    assert run.restarts == 0


def test_other_errors_pass_through():
    run = _Run(failing={1}, error=ValueError("bad row"))
    with pytest.raises(ValueError, match="bad row"):
        _fit(run)
    assert run.restarts == 0


@pytest.mark.slow
def test_the_train_stage_restarts_cleanly_after_running_out_of_memory(
    quantized, prepared, tmp_path, monkeypatch
):
    """An out-of-memory error after two optimizer steps (the adapter and the optimizer have
    moved): the retry starts from the initial adapter and the seed's RNG, so its losses and
    its adapter are those of a run that never failed; nothing of the failed attempt is
    logged."""
    from safetensors.torch import load_file
    from transformers import Trainer

    from qlora_kfp.stages.train import run_train

    cfg = TrainConfig(
        lora_r=8,
        lora_dropout=0.1,
        max_steps=4,
        batch_size=4,
        checkpoint_steps=0,
        logging_steps=1,
        warmup_ratio=0.0,  # the steps before the failure do move the adapter
        lr_scheduler="constant",
        learning_rate=1e-2,
    )
    clean = run_train(cfg, quantized.path, prepared.path, str(tmp_path / "clean"))

    real_step = Trainer.training_step
    failed = []

    def step(self, *args, **kwargs):
        if not failed and self.state.global_step == 2:
            failed.append(self.state.global_step)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", step)
    retried = run_train(cfg, quantized.path, prepared.path, str(tmp_path / "retried"))
    assert failed == [2]
    assert retried.metrics["memory_settings_tried"] == 2
    assert retried.metrics["checkpointed_layers"] > clean.metrics["checkpointed_layers"]
    losses = [[h["loss"] for h in r.history if "loss" in h] for r in (clean, retried)]
    assert len(losses[1]) == 4  # the failed attempt's first step is not in the history
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    want = load_file(tmp_path / "clean" / "adapter_model.safetensors")
    got = load_file(tmp_path / "retried" / "adapter_model.safetensors")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
