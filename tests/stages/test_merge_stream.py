"""The merge stage merges shard by shard and checks the model it wrote.

The streaming merge (qlora_kfp/training/merge_shards.py) must write what peft's
``merge_and_unload`` computes, for each kind of adapter the project's train stage can make
(LoRA, rsLoRA, DoRA) and those peft can (rank/alpha patterns, modules_to_save, embeddings,
biases, ``fan_in_fan_out``); hold about one shard, not the model; and the check must catch a
wrong merge before anything that looks complete is left.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest

from qlora_kfp.configs import MergeConfig
from qlora_kfp.errors import ArtifactError, ConfigError, VerificationError
from qlora_kfp.storage import manifest

SHARD = "200KB"  # the tiny Llama (840 KB in bfloat16) in 5 shards


def _base(demo_assets, dest: Path) -> str:
    """The demo base, saved again in several shards."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(demo_assets["base_model"])
    model.save_pretrained(dest, max_shard_size=SHARD)
    AutoTokenizer.from_pretrained(demo_assets["base_model"]).save_pretrained(dest)
    assert len(list(dest.glob("model-*.safetensors"))) > 2
    return str(dest)


def _adapter(base: str, dest: Path, seed: int = 0, model=None, **lora):
    """A random adapter artifact on ``base`` and the peft model it was saved from."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_kfp.storage.fingerprint import model_fingerprint

    model = model or AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(**lora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # lora_B starts at zero: an untrained adapter would change nothing
        for name, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * (0.02 if "lora_" in name else 0.01))
    peft_model.save_pretrained(dest)
    if (Path(base) / "tokenizer.json").is_file():
        AutoTokenizer.from_pretrained(base).save_pretrained(dest)
        record = {"base_model": base, "base_model_fingerprint": model_fingerprint(base)}
        (dest / "train.json").write_text(json.dumps(record))
    manifest.write_manifest(dest, "adapter")
    return str(dest), peft_model


def _written(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _tiny_gpt2(dest: Path) -> str:
    """GPT-2 shapes: Conv1D layers (fan_in_fan_out) with biases, tied embeddings."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    )
    model.save_pretrained(dest, max_shard_size="20KB")
    return str(dest)


CASES = {
    "lora-all-linear": dict(r=8, lora_alpha=16, target_modules="all-linear"),
    "rslora-patterns": dict(
        r=8,
        lora_alpha=16,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "up_proj"],
        rank_pattern={"v_proj": 4},
        alpha_pattern={"up_proj": 4},
    ),
    "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "down_proj"]),
    "embedding-and-modules-to-save": dict(
        r=4, lora_alpha=8, target_modules=["embed_tokens", "k_proj"], modules_to_save=["lm_head"]
    ),
}


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("case", list(CASES))
def test_streamed_weights_equal_peft_merge(demo_assets, tmp_path, case, dtype):
    """Every written tensor equals peft's merge_and_unload, cast to merge_dtype, to the bit."""
    import torch

    from qlora_kfp.training.merge_shards import merge_to_folder

    base = _base(demo_assets, tmp_path / "base")
    adapter, peft_model = _adapter(base, tmp_path / "adapter", **CASES[case])
    out = tmp_path / "out"
    out.mkdir()
    stats = merge_to_folder(base, adapter, out, dtype, SHARD)
    written = _written(out)
    with torch.no_grad():
        expected = peft_model.merge_and_unload().state_dict()
    assert set(written) == set(_written(Path(base)))
    for name, tensor in written.items():
        assert tensor.dtype == getattr(torch, dtype), name
        assert torch.equal(tensor, expected[name].to(tensor.dtype)), name
    assert stats["shards"] > 2 and (out / "model.safetensors.index.json").is_file()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(written)


def test_fan_in_fan_out_and_biases_equal_peft_merge(tmp_path):
    """GPT-2's Conv1D weights are stored (in, out): the delta is transposed; bias="all"
    saves the trained biases, which replace the base's."""
    import torch

    from qlora_kfp.training.merge_shards import merge_to_folder

    base = _tiny_gpt2(tmp_path / "base")
    adapter, peft_model = _adapter(
        base,
        tmp_path / "adapter",
        r=4,
        lora_alpha=8,
        target_modules=["c_attn", "c_fc"],
        fan_in_fan_out=True,
        bias="all",
    )
    out = tmp_path / "out"
    out.mkdir()
    merge_to_folder(base, adapter, out, "float32", "20KB")
    with torch.no_grad():
        expected = peft_model.merge_and_unload().state_dict()
    written = _written(out)
    assert any(k.endswith("c_attn.bias") for k in written)
    for name, tensor in written.items():
        assert torch.equal(tensor, expected[name]), name


def test_a_pytorch_bin_base_merges_the_same(demo_assets, tmp_path):
    """A base in ``pytorch_model.bin`` (memory-mapped, read tensor by tensor) gives the same
    safetensors shards."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from qlora_kfp.training.merge_shards import merge_to_folder

    base = tmp_path / "base"
    base.mkdir()
    shutil.copyfile(Path(demo_assets["base_model"]) / "config.json", base / "config.json")
    model = AutoModelForCausalLM.from_pretrained(demo_assets["base_model"])
    torch.save(model.state_dict(), base / "pytorch_model.bin")  # transformers 5 writes none
    adapter, peft_model = _adapter(str(base), tmp_path / "adapter", **CASES["lora-all-linear"])
    out = tmp_path / "out"
    out.mkdir()
    merge_to_folder(str(base), adapter, out, "bfloat16", SHARD)
    with torch.no_grad():
        expected = peft_model.merge_and_unload().state_dict()
    written = _written(out)
    assert len(list(out.glob("model-*.safetensors"))) > 2 and len(written) == 21
    for name, tensor in written.items():
        assert torch.equal(tensor, expected[name].to(tensor.dtype)), name


def _merge(base, adapter, out, **kw):
    from qlora_kfp.stages.merge import run_merge

    return run_merge(MergeConfig(base_model=base, **kw), adapter, str(out))


def test_the_check_passes_with_layers_offloaded_to_disk(demo_assets, tmp_path, monkeypatch):
    """A budget of 1 MiB (the float32 model is 1.7 MB): both models of the check run with
    layers on the disk, and the written model still matches peft's merge exactly."""
    from qlora_kfp.training import merge_check

    placed, load = [], merge_check._load

    def spy(*args):
        model = load(*args)
        placed.append(set(model.hf_device_map.values()))
        return model

    monkeypatch.setattr(merge_check, "_load", spy)
    base = _base(demo_assets, tmp_path / "base")
    adapter, _ = _adapter(base, tmp_path / "adapter", **CASES["lora-all-linear"])
    res = _merge(base, adapter, tmp_path / "merged", merge_memory_gib=0.001)
    assert placed == [{"cpu", "disk"}, {"cpu", "disk"}]
    assert res.metrics["merge_max_abs_diff"] == 0.0
    assert 0 < res.metrics["merge_rounding_diff"] < 0.2  # bfloat16's rounding, not an error
    assert sorted(p.name for p in Path(res.path).iterdir() if p.name.startswith(".")) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "merged"]
    # peft writes the offloaded shards it rewrites relative to the working folder: not here.
    assert not Path("tmp").exists()


def test_a_wrong_merge_is_caught_and_nothing_is_left(demo_assets, tmp_path, monkeypatch):
    from qlora_kfp.training import lora_delta

    delta = lora_delta.delta_weight
    monkeypatch.setattr(lora_delta, "delta_weight", lambda *a: delta(*a) * 1.5)
    base = _base(demo_assets, tmp_path / "base")
    adapter, _ = _adapter(base, tmp_path / "adapter", **CASES["lora-all-linear"])
    with pytest.raises(VerificationError, match="the merged model was not saved"):
        _merge(base, adapter, tmp_path / "merged", merge_memory_gib=0.001)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]


def test_a_written_model_missing_a_tensor_is_refused(demo_assets, tmp_path, monkeypatch):
    """A merge that loses the final norm's weight: transformers would load the written model
    with that norm initialized to ones (what the random demo base holds, so the logits still
    agree); the check loads it as the stages load models, refusing missing tensors."""
    import safetensors.torch

    save = safetensors.torch.save_file

    def lose_the_norm(tensors, path, metadata=None):
        tensors.pop("model.norm.weight", None)
        save(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", lose_the_norm)
    base = _base(demo_assets, tmp_path / "base")
    adapter, _ = _adapter(base, tmp_path / "adapter", **CASES["lora-all-linear"])
    with pytest.raises(ArtifactError, match=r"tensor model\.norm\.weight is missing"):
        _merge(base, adapter, tmp_path / "merged")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]


def _alive_tensor_bytes(before: set[int]) -> int:
    import torch

    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and id(obj) not in before and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def test_the_merge_holds_about_one_shard(demo_assets, tmp_path, monkeypatch):
    """When each shard is written, the tensors alive are that shard's and the adapter's: far
    less than the model (the whole merged model, built to be saved, was alive before)."""
    import safetensors.torch
    import torch
    import transformers.modeling_utils

    from qlora_kfp.training import merge_check

    base = _base(demo_assets, tmp_path / "base")
    adapter = _adapter(base, tmp_path / "adapter", **CASES["lora-all-linear"])[0]
    monkeypatch.setattr(manifest, "SHARD_SIZE", SHARD)
    # The check loads whole models by design (within merge_memory_gib): only the merge counts.
    monkeypatch.setattr(merge_check, "compare", lambda *a, **k: (torch.zeros(1),) * 3)
    gc.collect()
    before = {id(o) for o in gc.get_objects() if isinstance(o, torch.Tensor)}
    peaks, save = [], safetensors.torch.save_file

    def spy(tensors, *args, **kwargs):
        peaks.append(_alive_tensor_bytes(before))
        return save(tensors, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", spy)
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", spy)
    _merge(base, adapter, tmp_path / "merged")
    model_bytes = sum(f.stat().st_size for f in Path(base).glob("*.safetensors"))
    adapter_bytes = (Path(adapter) / "adapter_model.safetensors").stat().st_size
    assert len(peaks) > 2, "one save a shard"
    assert max(peaks) <= 200_000 + adapter_bytes + 50_000 < model_bytes / 2, (peaks, model_bytes)


def test_the_check_holds_each_model_within_its_budget(demo_assets, tmp_path, monkeypatch):
    """At each of the check's three forward passes the tensors alive (besides the offloaded
    ones, on disk) fit merge_memory_gib (1 MiB): less than the float32 model (1.7 MB). peft's
    merge_and_unload kept every merged disk-offloaded layer in memory."""
    import torch

    from qlora_kfp.training import merge_check

    base = _base(demo_assets, tmp_path / "base")
    adapter = _adapter(base, tmp_path / "adapter", **CASES["lora-all-linear"])[0]
    gc.collect()
    before = {id(o) for o in gc.get_objects() if isinstance(o, torch.Tensor)}
    alive, logits = [], merge_check._logits

    def spy(model, ids):
        alive.append(_alive_tensor_bytes(before))
        return logits(model, ids)

    monkeypatch.setattr(merge_check, "_logits", spy)
    _merge(base, adapter, tmp_path / "merged", merge_memory_gib=0.001)
    model_bytes = 2 * sum(f.stat().st_size for f in Path(base).glob("*.safetensors"))
    assert len(alive) == 3 and max(alive) <= 2**20 + 200_000 < model_bytes, (alive, model_bytes)


def _rewrite_adapter(adapter: str, edit) -> None:
    from safetensors.torch import load_file, save_file

    path = Path(adapter) / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    manifest.write_manifest(adapter, "adapter")


def test_an_adapter_tensor_the_base_lacks_names_both_folders(demo_assets, tmp_path):
    base = _base(demo_assets, tmp_path / "base")
    adapter, _ = _adapter(base, tmp_path / "adapter", **CASES["lora-all-linear"])

    # An adapter of a deeper model: its layer 7 is not in the base.
    def deeper(tensors):
        for key in [k for k in tensors if ".layers.1.self_attn.q_proj." in k]:
            tensors[key.replace(".layers.1.", ".layers.7.")] = tensors.pop(key)

    _rewrite_adapter(adapter, deeper)
    new = "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"
    with pytest.raises(ArtifactError) as got:
        _merge(base, adapter, tmp_path / "merged")
    text = str(got.value)
    assert new in text and "model.layers.7.self_attn.q_proj.weight" in text, text
    assert adapter in text and base in text and "\n" not in text
    assert not (tmp_path / "merged").exists()


def test_an_adapter_tensor_of_an_unknown_kind_is_refused(demo_assets, tmp_path):
    base = _base(demo_assets, tmp_path / "base")
    adapter, _ = _adapter(base, tmp_path / "adapter", **CASES["lora-all-linear"])
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_X.weight"
    _rewrite_adapter(adapter, lambda t: t.update({key: t[key.replace("lora_X", "lora_A")].clone()}))
    with pytest.raises(ArtifactError, match=f"adapter tensor {key} is of a kind"):
        _merge(base, adapter, tmp_path / "merged")


@pytest.mark.parametrize(
    "field,value",
    [
        ("lora_bias", True),
        ("use_qalora", True),
        ("peft_type", "IA3"),
        ("init_lora_weights", "pissa"),
    ],
)
def test_an_adapter_kind_the_merge_cannot_fold_is_refused_in_one_line(
    demo_assets, tmp_path, field, value
):
    base = _base(demo_assets, tmp_path / "base")
    adapter, _ = _adapter(base, tmp_path / "adapter", **CASES["lora-all-linear"])
    path = Path(adapter) / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
    manifest.write_manifest(adapter, "adapter")
    with pytest.raises(ArtifactError) as got:
        _merge(base, adapter, tmp_path / "merged")
    text = str(got.value)
    assert text.startswith(f"{path}: {field}={value!r}") and "\n" not in text, text
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("value", [-1.0, float("inf"), float("nan")])
def test_merge_memory_gib_must_be_finite_and_not_negative(value):
    with pytest.raises(ConfigError, match="merge_memory_gib"):
        MergeConfig(base_model="m", merge_memory_gib=value)


def test_the_check_budget_counts_a_pods_memory_limit(monkeypatch):
    """merge_memory_gib=0 takes 80% of what the host can still give, a pod's memory limit
    counted (psutil, which accelerate asks, sees the node's memory)."""
    import accelerate.utils

    from qlora_kfp.training import autofit, merge_check

    monkeypatch.setattr(accelerate.utils, "get_max_memory", lambda: {"cpu": 500 * 2**30})
    monkeypatch.setattr(autofit, "host_available_gib", lambda: 10.0)
    assert merge_check.max_memory(0) == {"cpu": 8 * 2**30}
    assert merge_check.max_memory(1.5)["cpu"] == int(1.5 * 2**30)
