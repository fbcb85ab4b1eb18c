"""bench/build_4bit.py: the 4-bit checkpoint it writes is the one transformers writes.

The 70B benchmark trains on a checkpoint this builder writes layer by layer (no 16-bit
checkpoint exists there). Fed the tiny demo model's own weights, it must produce the same
packed weights and quantization state that transformers' bitsandbytes loading produces
from that model, and a checkpoint that ``modeling.load_model`` loads as 4-bit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


@pytest.fixture(scope="module")
def built(demo_assets, tmp_path_factory):
    from build_4bit import build
    from safetensors.torch import load_file
    from transformers import AutoConfig

    base = Path(demo_assets["base_model"])
    weights = load_file(base / "model.safetensors")
    asked: list[str] = []

    def source(name, shape):
        asked.append(name)
        assert tuple(weights[name].shape) == tuple(shape), name
        return weights[name].to(torch.bfloat16)

    out = tmp_path_factory.mktemp("built")
    info = build(AutoConfig.from_pretrained(base), out, source, layers_per_shard=1)
    return out, info, asked, weights


def test_every_weight_is_asked_for_once_and_sharded(built):
    out, info, asked, weights = built
    assert sorted(asked) == sorted(weights)
    assert info["shards"] == 3  # one per layer (2) and the last one with norm and head
    assert len(list(out.glob("model-*-of-00003.safetensors"))) == 3


def test_same_packed_weights_as_transformers_quantizing_the_model(built, demo_assets):
    import bitsandbytes as bnb

    from qlora_kfp.training import modeling

    out, _, _, _ = built
    ours = modeling.load_model(str(out), dtype=torch.bfloat16)
    theirs = modeling.load_model(
        demo_assets["base_model"],
        dtype=torch.bfloat16,
        quantization_config=modeling.bnb_config("nf4", True, "bfloat16"),
    )
    mods = dict(theirs.named_modules())
    n = 0
    for name, mod in ours.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            ref = mods[name]
            assert torch.equal(mod.weight.data, ref.weight.data), name
            a, b = mod.weight.quant_state, ref.weight.quant_state
            assert torch.equal(a.absmax, b.absmax) and torch.equal(a.state2.absmax, b.state2.absmax)
            n += 1
    assert n == 7 * 2
    ids = torch.tensor([[3, 5, 7, 11, 13]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits)


@pytest.mark.slow
def test_the_train_stage_trains_on_what_the_benchmarks_build(demo_assets, prepared, tmp_path):
    """Both benchmark writers leave the record the quantize stage leaves (what the model was
    made from): without it run_train stopped on a missing quantize.json."""
    import json

    from build_4bit import build_artifact
    from train_bench import quantize
    from transformers import AutoConfig

    from qlora_kfp.configs import TrainConfig
    from qlora_kfp.stages.train import run_train
    from qlora_kfp.storage.fingerprint import model_fingerprint

    built = tmp_path / "built"
    build_artifact(AutoConfig.from_pretrained(demo_assets["base_model"]), built, seed=3)
    quantized = tmp_path / "quantized"
    quantize(demo_assets["base_model"], quantized)
    made = json.loads((quantized / "quantize.json").read_text())
    assert made["config"]["base_model"] == demo_assets["base_model"]
    assert made["base_model_fingerprint"] == model_fingerprint(demo_assets["base_model"])
    cfg = TrainConfig(max_steps=1, batch_size=4, lora_r=8, logging_steps=1)
    res = run_train(cfg, str(built), prepared.path, str(tmp_path / "adapter"))
    assert res.metrics["steps"] == 1
    record = json.loads((tmp_path / "adapter" / "train.json").read_text())
    assert record["base_model"] == "random-weights:seed=3"


def test_a_quantized_model_without_its_record_is_a_clear_error(tmp_path):
    from qlora_kfp.errors import ArtifactError
    from qlora_kfp.storage.artifacts import base_model_of

    with pytest.raises(ArtifactError, match=r"quantize.json: cannot read what the quantized"):
        base_model_of(str(tmp_path))


@pytest.mark.slow
def test_a_benchmark_variant_runs_the_train_stage_end_to_end(demo_assets, tmp_path):
    """train_bench's own path on the CPU (quantize, dataset writer, variant parsing, the train
    stage in its own process, the steady-rate arithmetic), on the demo model instead of 8B:
    a variant that fails comes back as ``{"error": ...}``, which would void a device call."""
    import torch
    from train_bench import (
        parse_variant,
        quantize,
        run_variant,
        steady_tokens_per_s,
        write_dataset,
    )

    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 400, (24,), generator=g).tolist() for _ in range(16)]
    write_dataset(rows, tmp_path / "data")
    quantize(demo_assets["base_model"], tmp_path / "model4")
    name, kw = parse_variant("cpu:bs=2,steps=3,opt=adamw_torch,drop=0,r=8,gcl=auto,off=off")
    assert name == "cpu" and kw["gradient_checkpointing_layers"] == "auto"
    got = run_variant(kw, tmp_path / "model4", tmp_path / "data", tmp_path / "adapter", steps=3)
    assert "error" not in got, got.get("error")
    assert got["m"]["steps"] == 3
    assert steady_tokens_per_s(got["h"], warmup=1) > 0
