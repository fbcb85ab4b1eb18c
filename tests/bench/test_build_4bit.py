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

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))


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
def test_the_train_stage_trains_on_what_the_benchmarks_build(demo_assets, tmp_path):
    """Both benchmark writers leave the record the quantize stage leaves (what the model was
    made from): without it run_train stopped on a missing quantize.json."""
    import json

    from build_4bit import build_artifact
    from train_bench import quantize, write_dataset
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
    # The benchmarks' own token rows: the stages refuse rows made with another tokenizer.
    rows = [[(7 * i + j) % 300 + 3 for j in range(16)] for i in range(8)]
    write_dataset(rows, tmp_path / "rows")
    cfg = TrainConfig(max_steps=1, batch_size=4, lora_r=8, logging_steps=1)
    res = run_train(cfg, str(built), str(tmp_path / "rows"), str(tmp_path / "adapter"))
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
        run_evaluate_stage,
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
    # bench_70b's evaluate phase: the evaluate stage on the variant's adapter, in its process
    ev = run_evaluate_stage(
        tmp_path / "model4",
        tmp_path / "adapter",
        tmp_path / "data",
        tmp_path / "evaluation",
        generations=2,
    )
    assert "error" not in ev, ev.get("error")
    assert ev["seconds"] > 0 and ev["metrics"]["tuned_eval_loss"] > 0


@pytest.mark.slow
def test_a_benchmark_variant_runs_on_two_processes(demo_assets, tmp_path):
    """``train_bench.py --nproc 1 2`` (``make bench-multi-gpu``) on the CPU: the variant's
    ``-np2`` run trains in two gloo processes under torchrun, and its rows give a rate."""
    import multi_gpu
    import torch
    from train_bench import parse_variant, quantize, run_variant, steady_tokens_per_s, write_dataset

    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 400, (24,), generator=g).tolist() for _ in range(16)]
    write_dataset(rows, tmp_path / "data")
    quantize(demo_assets["base_model"], tmp_path / "model4")
    spec = "cpu:bs=2,steps=3,opt=adamw_torch,drop=0,r=8,gcl=auto,off=off"
    runs = multi_gpu.expand([parse_variant(spec)], [1, 2])
    assert [(name, kw["num_processes"]) for name, kw in runs] == [("cpu-np1", 1), ("cpu-np2", 2)]
    name, kw = runs[1]  # -np1 is the single-process path the test above runs
    got = run_variant(kw, tmp_path / "model4", tmp_path / "data", tmp_path / name, steps=3)
    assert "error" not in got, got.get("error")
    assert got["m"]["steps"] == 3 and got["m"]["processes"] == 2
    assert steady_tokens_per_s(got["h"], warmup=1) > 0


def test_the_scaling_table_sets_each_gpu_count_against_one_gpu():
    import multi_gpu

    table = [
        {"variant": "v-np1", "num_processes": 1, "tokens_per_s": 5000.0, "peak_gib": 60.0},
        {"variant": "v-np2", "num_processes": 2, "tokens_per_s": 9400.0, "peak_gib": 60.6},
    ]
    one, two = multi_gpu.scaling(table)
    assert (one["gpus"], one["speedup_vs_1gpu"], one["efficiency"]) == (1, 1.0, 1.0)
    assert (two["gpus"], two["speedup_vs_1gpu"], two["efficiency"]) == (2, 1.88, 0.94)
    assert two["tokens_per_s_per_gpu"] == 4700.0 and two["per_gpu_peak_gib"] == 60.6
    assert multi_gpu.expand([("v", {"batch_size": 2})], []) == [("v", {"batch_size": 2})]
