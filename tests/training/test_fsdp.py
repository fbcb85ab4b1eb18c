"""FSDP-QLoRA on the CPU with gloo: the 4-bit base sharded over two processes trains the same
adapter as DDP, its weights gather back to the quantized bytes, a killed run resumes; the
``parallelism=auto`` decision (the one function preflight and the train stage call); and the
refusal of models whose 4-bit weights FSDP cannot shard.

The training runs are tests/support/ranks.py's (``CFG``, two processes under torchrun), on the tiny
random Llama quantized with ``quant_storage=bfloat16`` (real bitsandbytes NF4 layers).
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support.ranks import CFG, PROBE, adapter, kill_once_sealed, result, start
from transformers import LlamaConfig

from qlora_kfp import preflight
from qlora_kfp.configs import QuantizeConfig, TrainConfig
from qlora_kfp.errors import ConfigError
from qlora_kfp.training import fsdp, parallelism

# The first of the two layers recomputes its activations: FSDP gathers its weights again in
# backward, the second keeps its own.
FSDP = dict(
    num_processes=2,
    batch_size=2,
    parallelism="fsdp",
    gradient_checkpointing=True,
    gradient_checkpointing_layers="1",
)
SHAPES = dict(num_attention_heads=64, num_key_value_heads=8, vocab_size=128256)
LLAMA_70B = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, **SHAPES)
LLAMA_8B = LlamaConfig(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    **{**SHAPES, "num_attention_heads": 32},
)


@pytest.fixture(scope="module")
def quantized_bf16(demo_assets, prepared, tmp_path_factory):
    """The tiny model in 4 bit, its packed weights stored as bfloat16 (FSDP can shard them)."""
    from qlora_kfp.stages.quantize import run_quantize

    out = tmp_path_factory.mktemp("quantized-bf16") / "model"
    cfg = QuantizeConfig(base_model=demo_assets["base_model"], quant_storage="bfloat16")
    return run_quantize(cfg, str(out), prepared.path)


@pytest.fixture(scope="module")
def preempted_fsdp(quantized_bf16, prepared, rank_site, tmp_path_factory):
    """An FSDP run killed (the stage's whole process group) once checkpoint-3 is sealed, then
    started again: it resumes and finishes. After its final evaluation every rank runs the
    model on ``PROBE`` and gathers its whole state; rank 0 saves both in ``dump``."""
    root = tmp_path_factory.mktemp("fsdp")
    out, dump = root / "adapter", root / "dump"
    dump.mkdir()
    sealed = Path(f"{out}.checkpoints") / "checkpoint-3"
    model, data = quantized_bf16.path, prepared.path
    kill_once_sealed(start(model, data, out, rank_site, step_s=0.4, **FSDP), sealed)
    files = sorted(p.name for p in sealed.iterdir())
    resumed = result(start(model, data, out, rank_site, dump=dump, **FSDP))
    return types.SimpleNamespace(out=out, dump=dump, checkpoint_files=files, run=resumed)


@pytest.mark.slow
def test_fsdp_trains_lora_and_its_adapter_gives_the_sharded_model_s_logits_on_one_process(
    preempted_fsdp, quantized_bf16
):
    from peft import PeftModel

    from qlora_kfp.training import modeling

    metrics = preempted_fsdp.run["metrics"]
    assert metrics["processes"] == 2 and metrics["steps"] == 8
    saved = adapter(preempted_fsdp.out)
    # peft starts every lora_B at zero: trained, each has moved.
    lora_b = [k for k in saved if "lora_B" in k]
    assert len(lora_b) == 14 and all(saved[k].abs().max() > 0 for k in lora_b)
    base = modeling.load_model(quantized_bf16.path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, preempted_fsdp.out)
    # Train mode (no dropout here): bitsandbytes' generic CPU kernel, as under FSDP. In eval
    # mode this CPU would repack the weights for another kernel (1e-3 apart).
    model.train()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(PROBE)).logits
    sharded = torch.load(preempted_fsdp.dump / "logits.pt")
    # Measured 0 apart; a wrong or stale adapter moves them by 1e-2 and more.
    torch.testing.assert_close(logits, sharded, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_the_trained_fsdp_model_gathers_back_to_the_quantized_bytes_and_quant_states(
    preempted_fsdp, quantized_bf16
):
    """Round trip: the 4-bit weights sharded over two processes, trained on (frozen) and
    evaluated, gather back to the quantize stage's file byte for byte, quantization
    constants included (absmax, code books and the packed state record)."""
    (weights,) = Path(quantized_bf16.path).glob("*.safetensors")
    original = load_file(weights)
    gathered = {
        k.removeprefix("base_model.model.").replace(".base_layer", ""): v
        for k, v in torch.load(preempted_fsdp.dump / "state.pt").items()
        if "lora_" not in k
    }
    packed = "model.layers.0.self_attn.q_proj.weight"
    assert original[packed].dtype == torch.bfloat16  # what FSDP shards
    assert sum(k.endswith(".absmax") for k in original) == 14
    assert sorted(gathered) == sorted(original)
    for k, want in original.items():
        got = gathered[k]
        assert (got.dtype, got.shape) == (want.dtype, want.shape), k
        assert torch.equal(got.contiguous().view(torch.uint8), want.view(torch.uint8)), k


@pytest.mark.slow
def test_a_killed_fsdp_run_resumes_from_its_sealed_checkpoint_to_ddp_s_adapter(
    preempted_fsdp, two_processes
):
    """The FSDP run killed after checkpoint 3 and resumed ends where DDP's uninterrupted run
    on the same global batch ends (same rows, same steps; tests/training/test_ddp.py shows DDP is one
    process's training)."""
    assert {
        "MANIFEST.json",
        "pytorch_model_fsdp.bin",  # the whole LoRA state, gathered
        "optimizer.bin",
        "rng_state_0.pth",
        "rng_state_1.pth",
    } <= set(preempted_fsdp.checkpoint_files)
    metrics = preempted_fsdp.run["metrics"]
    assert metrics["resumed_from_step"] == 3 and metrics["steps"] == 8
    ddp_out, _ = two_processes
    a, b = adapter(ddp_out), adapter(preempted_fsdp.out)
    assert a.keys() == b.keys()
    # As test_ddp's comparison: float32 summation order apart (a reduce-scatter of shards
    # against an all-reduce), measured 1.4e-6 at most; a step trained twice or an optimizer
    # state lost moves many elements by about the learning rate.
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=CFG["learning_rate"] / 100)
    diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert (diffs > 1e-5).float().mean() < 0.01
    # Rank 0 alone wrote the adapter; the checkpoints are gone once it is complete.
    assert sorted(p.name for p in preempted_fsdp.out.parent.iterdir()) == ["adapter", "dump"]


@pytest.mark.parametrize(
    "model_cfg, processes, setting, gpu_gib, want",
    [
        pytest.param(LLAMA_8B, 2, "auto", 80.0, "ddp", id="8b-fits-one-80gib-gpu-ddp"),
        pytest.param(LLAMA_70B, 4, "auto", 80.0, "ddp", id="70b-fits-one-80gib-gpu-ddp"),
        pytest.param(LLAMA_70B, 4, "auto", 40.0, "fsdp", id="70b-over-40gib-gpus-fsdp"),
        pytest.param(LLAMA_70B, 1, "auto", 40.0, "none", id="one-process-none"),
        pytest.param(LLAMA_70B, 4, "ddp", 40.0, "ddp", id="ddp-as-set-though-over"),
        pytest.param(LLAMA_8B, 2, "fsdp", 80.0, "fsdp", id="fsdp-as-set-though-ddp-fits"),
    ],
)
def test_parallelism_auto_takes_ddp_while_one_gpu_fits_it(
    model_cfg, processes, setting, gpu_gib, want
):
    cfg = TrainConfig(num_processes=processes, parallelism=setting, packing="bins")
    plan = parallelism.decide(model_cfg, cfg, 2048, gpu_gib, float("inf"), has_varlen=True)
    assert plan.mode == want
    if want == "fsdp" and setting == "auto":
        assert plan.ddp_gib > 0.95 * gpu_gib >= plan.fsdp_gib


def _quantized_config(folder: Path, model_cfg, storage: str) -> str:
    """A folder holding only the ``config.json`` of ``model_cfg`` quantized with ``storage``."""
    model_cfg.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    config["quantization_config"]["bnb_4bit_quant_storage"] = storage
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def test_preflight_and_the_train_stage_choose_fsdp_alike(tmp_path, prepared, caplog):
    import logging

    from qlora_kfp.stages.train import decide_parallelism

    model_dir = _quantized_config(tmp_path, LLAMA_70B, "bfloat16")
    cfg = TrainConfig(num_processes=4, gpu_memory_gib=40.0)
    with caplog.at_level(logging.INFO, logger="qlora_kfp"):
        parts = preflight.check_memory(model_dir, cfg, 64, 40.0, "bfloat16")
    assert "parallelism=auto chose fsdp" in caplog.text
    assert "4-bit weights (shard)" in parts and "DDP gradient buckets" not in parts
    assert decide_parallelism(cfg, model_dir, prepared.path).parallelism == "fsdp"


@pytest.mark.parametrize(
    "storage, compute_dtype, on_gpu, refused",
    [
        pytest.param("uint8", "auto", False, "re-quantize with quant_storage=bfloat16", id="uint8"),
        pytest.param("uint8", "float16", True, "quant_storage=float16", id="uint8-fp16-gpu"),
        pytest.param("bfloat16", "auto", True, "", id="bf16-on-bf16-gpu"),
        pytest.param("float32", "auto", False, "", id="fp32-cpu-no-cast"),
        pytest.param("float32", "float32", True, "", id="fp32-gpu-no-cast"),
        pytest.param("float32", "auto", True, "quant_storage=bfloat16", id="fp32-cast-to-bf16"),
        pytest.param("float16", "bfloat16", True, "quant_storage=bfloat16", id="fp16-cast-to-bf16"),
    ],
)
def test_fsdp_refuses_weights_it_cannot_shard_or_would_cast(
    storage, compute_dtype, on_gpu, refused
):
    if not refused:
        fsdp.check_storage(storage, compute_dtype, on_gpu, "m", "parallelism=fsdp")
        return
    with pytest.raises(ConfigError) as exc:
        fsdp.check_storage(storage, compute_dtype, on_gpu, "m", "parallelism=fsdp")
    assert refused in str(exc.value) and "\n" not in str(exc.value)


def test_the_train_stage_refuses_fsdp_on_a_uint8_model_in_one_line(quantized, prepared, tmp_path):
    out = tmp_path / "adapter"
    cfg = TrainConfig(num_processes=2, parallelism="fsdp", max_steps=1)
    with pytest.raises(ConfigError) as exc:
        from qlora_kfp.stages.train import run_train

        run_train(cfg, quantized.path, prepared.path, str(out))
    assert str(exc.value) == (
        f"parallelism=fsdp needs 4-bit weights stored in a float dtype FSDP can shard, but "
        f"{quantized.path} stores them as uint8: re-quantize with quant_storage=bfloat16, or "
        "use parallelism=ddp"
    )
    assert not out.exists() and not Path(f"{out}.checkpoints").exists()


def test_preflight_refuses_auto_s_fsdp_on_uint8_storage(tmp_path):
    model_dir = _quantized_config(tmp_path, LLAMA_70B, "uint8")
    cfg = TrainConfig(num_processes=4, gpu_memory_gib=40.0)
    with pytest.raises(ConfigError, match=r"^parallelism=auto chose fsdp \(one GPU under DDP: "):
        preflight.check_memory(model_dir, cfg, 64, 40.0, "uint8")
