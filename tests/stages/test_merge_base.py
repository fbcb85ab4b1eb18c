"""Merge and evaluate check that the adapter belongs to the base model they are given.

The logit check compares base+adapter with the merged model *on the base it is given*, so an
adapter merged into another base of the same shapes passes it; the fingerprint of the base's
weights recorded at training time does not.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlora_kfp.configs import MergeConfig
from qlora_kfp.errors import ProvenanceError
from qlora_kfp.storage.fingerprint import model_fingerprint

pytestmark = pytest.mark.slow


def _copy_of_base(demo_assets, dest: Path, seed: int, **save_kw) -> str:
    """The demo base's tokenizer and shapes, with the weights of ``seed`` (0: its own)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_kfp.app.demo import build_model

    tok = AutoTokenizer.from_pretrained(demo_assets["base_model"])
    if seed == 0:  # the same weights, saved again in float32
        model = AutoModelForCausalLM.from_pretrained(demo_assets["base_model"], dtype=torch.float32)
    else:
        model = build_model(len(tok), seed=seed).to(torch.bfloat16)
    model.save_pretrained(dest, safe_serialization=True, **save_kw)
    tok.save_pretrained(dest)
    return str(dest)


@pytest.fixture(scope="module")
def other_base(demo_assets, tmp_path_factory):
    return _copy_of_base(demo_assets, tmp_path_factory.mktemp("other") / "model", seed=1)


@pytest.fixture(scope="module")
def resaved_base(demo_assets, tmp_path_factory):
    dest = tmp_path_factory.mktemp("resaved") / "model"
    path = _copy_of_base(demo_assets, dest, seed=0, max_shard_size="200KB")
    assert len(list(Path(path).glob("*.safetensors"))) > 1
    return path


def test_the_fingerprint_follows_the_weights_not_the_files(demo_assets, other_base, resaved_base):
    base = model_fingerprint(demo_assets["base_model"])
    assert model_fingerprint(resaved_base) == base, "float32, other shards: the same weights"
    assert model_fingerprint(other_base) != base, "same shapes, other weights"


def test_the_adapter_records_its_base(demo_assets, trained):
    record = json.loads((Path(trained.path) / "train.json").read_text())
    assert record["base_model"] == demo_assets["base_model"]
    assert record["base_model_fingerprint"] == model_fingerprint(demo_assets["base_model"])


def test_merge_refuses_another_base_of_the_same_shapes(demo_assets, trained, other_base, tmp_path):
    from qlora_kfp.stages.merge import run_merge

    with pytest.raises(ProvenanceError) as got:
        run_merge(MergeConfig(base_model=other_base), trained.path, str(tmp_path / "merged"))
    text = str(got.value)
    assert demo_assets["base_model"] in text and f"base_model={other_base}" in text
    assert "\n" not in text and not (tmp_path / "merged").exists()


def test_merge_accepts_another_copy_of_its_base(resaved_base, trained, tmp_path):
    from qlora_kfp.stages.merge import run_merge

    res = run_merge(MergeConfig(base_model=resaved_base), trained.path, str(tmp_path / "merged"))
    assert res.metrics["merge_max_abs_diff"] <= 1e-3


def test_evaluate_refuses_a_quantized_copy_of_another_base(trained, prepared, other_base, tmp_path):
    from qlora_kfp.configs import EvaluateConfig, QuantizeConfig
    from qlora_kfp.stages.evaluate import run_evaluate
    from qlora_kfp.stages.quantize import run_quantize

    other4 = run_quantize(QuantizeConfig(base_model=other_base), str(tmp_path / "q"), prepared.path)
    out = tmp_path / "evaluation"
    with pytest.raises(ProvenanceError) as got:
        run_evaluate(EvaluateConfig(), other4.path, trained.path, prepared.path, str(out))
    text = str(got.value)
    assert f"quantized from {other_base}" in text and trained.path in text
    assert "\n" not in text and not out.exists()
