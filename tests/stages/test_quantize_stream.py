"""The quantize stage reads a sharded checkpoint shard by shard: no 16-bit model is built.

A 70B checkpoint in 16 bit (141 GB) fits neither a GPU nor most pods' memory; the stage must
compare each 4-bit weight with its original read from the shard files one at a time, and
compute the 16-bit reference perplexity only where the 16-bit model fits.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from qlora_kfp.configs import QuantizeConfig
from qlora_kfp.stages import quantize
from qlora_kfp.training import modeling, shards


@pytest.fixture(scope="module")
def sharded(demo_assets, tmp_path_factory):
    """The demo model saved in several safetensors shards, with its tokenizer."""
    from transformers import AutoModelForCausalLM

    src = demo_assets["base_model"]
    out = tmp_path_factory.mktemp("sharded") / "model"
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    model.save_pretrained(out, max_shard_size="200KB")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (p := Path(src) / f).is_file():
            shutil.copy(p, out / f)
    files = shards.weight_files(str(out))
    assert len(files) >= 3 and all(f.suffix == ".safetensors" for f in files)
    return str(out)


def _reference_error(base: str) -> float:
    """What the stage computed before: against the whole 16-bit model."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    dtype = modeling.resolve_dtype("auto")
    m16 = modeling.load_model(base, dtype=dtype)
    m4 = modeling.load_model(
        base, dtype=dtype, quantization_config=modeling.bnb_config("nf4", True, "auto")
    )
    ref = dict(m16.named_modules())
    num = den = 0.0
    for name, mod in m4.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            w = ref[name].weight.detach().float()
            dq = F.dequantize_4bit(mod.weight.data, mod.weight.quant_state).float()
            num += torch.linalg.norm(w - dq).item() ** 2
            den += torch.linalg.norm(w).item() ** 2
    return (num / den) ** 0.5


@pytest.fixture
def load_calls(monkeypatch):
    """Every ``modeling.load_model`` call's keyword arguments."""
    calls: list[dict] = []
    real = modeling.load_model

    def spy(source, **kw):
        calls.append(kw)
        return real(source, **kw)

    monkeypatch.setattr(modeling, "load_model", spy)
    return calls


def test_streamed_error_is_the_whole_model_error(sharded, prepared, tmp_path, load_calls):
    res = quantize.run_quantize(
        QuantizeConfig(base_model=sharded), str(tmp_path / "q"), prepared.path
    )
    m = res.metrics
    assert m["quant_layers"] == 2 * 7
    assert m["quant_rel_error"] == pytest.approx(_reference_error(sharded), rel=1e-5)
    # The demo model fits in memory: the 16-bit reference perplexity is still measured.
    assert m["eval_perplexity_16bit"] > 0 and m["eval_perplexity_4bit"] > 0
    assert m["params"] == sum(p.numel() for p in modeling.load_model(sharded).parameters())


def test_no_16bit_model_when_it_does_not_fit(sharded, prepared, tmp_path, load_calls, monkeypatch):
    monkeypatch.setattr(quantize, "room_for_16bit_bytes", lambda: 0.0)
    read: list[str] = []
    real = shards.tensors

    def counted(files, names=None):
        for key, t in real(files, names):
            read.append(key)
            yield key, t

    monkeypatch.setattr(shards, "tensors", counted)
    res = quantize.run_quantize(
        QuantizeConfig(base_model=sharded), str(tmp_path / "q"), prepared.path
    )
    assert load_calls and all(kw.get("quantization_config") is not None for kw in load_calls)
    assert "eval_loss_16bit" not in res.metrics and res.metrics["eval_loss_4bit"] > 0
    assert sorted(read) == sorted(set(read)) and len(read) == 2 * 7  # each weight read once


def test_bin_shards_are_read_tensor_by_tensor(tmp_path):
    state = {"a.weight": torch.randn(3, 4), "b.weight": torch.randn(2), "c.bias": torch.zeros(1)}
    torch.save(state, tmp_path / "pytorch_model.bin")
    files = [tmp_path / "pytorch_model.bin"]
    got = dict(shards.tensors(files, {"a.weight", "b.weight"}))
    assert got.keys() == {"a.weight", "b.weight"}
    torch.testing.assert_close(got["a.weight"], state["a.weight"])
    assert shards.tensor_numel(files) == 12 + 2 + 1


def test_only_the_weights_transformers_loads_are_read(sharded, tmp_path):
    """A repo may ship its weights twice (safetensors shards beside .bin shards, or a
    consolidated.safetensors): only the index's shards count."""
    import json

    copy = tmp_path / "model"
    shutil.copytree(sharded, copy)
    listed = shards.weight_files(str(copy))
    shutil.copy(listed[0], copy / "consolidated.safetensors")
    torch.save({"w": torch.zeros(4)}, copy / "pytorch_model.bin")
    again = shards.weight_files(str(copy))
    assert [f.name for f in again] == [f.name for f in listed]
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    assert {f.name for f in again} == set(index["weight_map"].values())


def _broken_copy(src: str, dst: Path, name: str, change: str) -> str:
    """A copy of the model at ``src`` whose tensor ``name`` is removed or poisoned."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("MANIFEST.json"))
    weights = load_file(dst / "model.safetensors")
    if change == "missing":
        del weights[name]
    else:
        weights[name] = weights[name].clone()
        weights[name].view(-1)[3] = float(change)
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return str(dst)


@pytest.mark.parametrize(
    "name,change,fragment",
    [
        pytest.param(
            "model.layers.1.mlp.down_proj.weight", "missing", "missing", id="missing-linear"
        ),
        pytest.param("model.norm.weight", "missing", "missing", id="missing-norm"),
        pytest.param("lm_head.weight", "missing", "missing", id="missing-head"),
        pytest.param(
            "model.layers.0.self_attn.q_proj.weight", "nan", "NaN or Inf", id="nan-linear"
        ),
        pytest.param("model.embed_tokens.weight", "inf", "NaN or Inf", id="inf-embedding"),
        pytest.param(
            "model.layers.0.input_layernorm.weight", "nan", "NaN or Inf", id="nan-layernorm"
        ),
    ],
)
def test_a_base_model_with_a_missing_or_nan_tensor_is_refused(
    demo_assets, tmp_path, name, change, fragment
):
    """transformers initializes a missing tensor at random, and NaN weights quantize to NaN
    (beside a finite "worst layer"): either would be a quantized model of another model."""
    from qlora_kfp.errors import ArtifactError

    base = _broken_copy(demo_assets["base_model"], tmp_path / "base", name, change)
    with pytest.raises(ArtifactError) as err:
        quantize.run_quantize(QuantizeConfig(base_model=base), str(tmp_path / "out"))
    msg = str(err.value)
    assert name in msg and fragment in msg and "\n" not in msg, msg
    assert not (tmp_path / "out").exists()
