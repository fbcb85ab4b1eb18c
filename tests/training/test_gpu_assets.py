"""The GPU tests' inputs are what the train stage accepts (checked on the CPU, since the GPU
tests never run in CI): built by the same function at a tiny shape, then trained one step."""

from __future__ import annotations

import pytest
from support import gpu_assets

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=320,
)


@pytest.mark.slow
def test_the_gpu_tests_inputs_train_on_the_cpu(tmp_path):
    from qlora_kfp.configs import TrainConfig
    from qlora_kfp.stages.train import run_train

    model, data = gpu_assets.build(tmp_path, TINY, seq=64, rows=8, device="cpu")
    cfg = TrainConfig(
        lora_r=4, batch_size=2, packing="bins", pack_length=64, max_steps=1, checkpoint_steps=0
    )
    result = run_train(cfg, model, data, str(tmp_path / "adapter"))
    assert [h["loss"] for h in result.history if "loss" in h]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
