"""Issue 23, "silently wrong": inputs that ran to rc 0 with wrong results now stop in one line.

Stage tests here build what they need by hand (an adapter without training, a model with
another tokenizer), so they run with the fast tests; each case would have finished before.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qlora_kfp.configs import EvaluateConfig, TrainConfig
from qlora_kfp.errors import ArtifactError
from qlora_kfp.storage import artifacts
from qlora_kfp.storage.manifest import write_manifest


def make_adapter(quantized, prepared, folder: Path) -> str:
    """A sealed adapter artifact as the train stage writes it, with fresh (untrained) LoRA
    weights on the quantized demo model."""
    from peft import get_peft_model
    from transformers import AutoTokenizer

    from qlora_kfp.training import modeling
    from qlora_kfp.training.peft_model import lora_config

    cfg = TrainConfig(lora_r=4)
    model = get_peft_model(modeling.load_model(quantized.path), lora_config(cfg))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(Path(prepared.path) / "tokenizer").save_pretrained(folder)
    made = artifacts.base_model_of(quantized.path)
    artifacts.write_train_record(folder, {"lora_r": 4}, {}, made)
    write_manifest(folder, "adapter")
    return str(folder)


def poison(adapter: str, part: str, value: float) -> str:
    """Set one value of the first ``part`` (lora_A, lora_B) tensor; re-seal the artifact, as
    an adapter sealed before the train stage checked its weights would be. Returns its name."""
    from safetensors.torch import load_file, save_file

    path = Path(adapter) / "adapter_model.safetensors"
    weights = load_file(path)
    name = next(k for k in sorted(weights) if part in k)
    weights[name].view(-1)[1] = value
    save_file(weights, path, metadata={"format": "pt"})
    write_manifest(adapter, "adapter")
    return name


@pytest.mark.parametrize(
    "part,value",
    [
        pytest.param("lora_A", float("nan"), id="nan-in-lora-A"),
        pytest.param("lora_B", float("inf"), id="inf-in-lora-B"),
        pytest.param("lora_B", float("-inf"), id="minus-inf-in-lora-B"),
    ],
)
def test_evaluate_refuses_a_nan_adapter(quantized, prepared, tmp_path, part, value):
    from qlora_kfp.stages.evaluate import run_evaluate

    adapter = make_adapter(quantized, prepared, tmp_path / "adapter")
    name = poison(adapter, part, value)
    with pytest.raises(ArtifactError) as err:
        run_evaluate(
            EvaluateConfig(eval_rows=4, num_generations=1, max_new_tokens=2),
            quantized.path,
            adapter,
            prepared.path,
            str(tmp_path / "out"),
        )
    msg = str(err.value)
    assert "adapter_model.safetensors" in msg and name in msg and "\n" not in msg, msg
    assert not (tmp_path / "out").exists()


def test_evaluate_takes_a_finite_adapter(quantized, prepared, tmp_path):
    """The hand-made adapter itself passes: the refusal above is the poisoned tensor's."""
    from qlora_kfp.stages.evaluate import run_evaluate

    adapter = make_adapter(quantized, prepared, tmp_path / "adapter")
    res = run_evaluate(
        EvaluateConfig(eval_rows=4, num_generations=1, max_new_tokens=2),
        quantized.path,
        adapter,
        prepared.path,
        str(tmp_path / "out"),
    )
    assert res.metrics["generations"] == 1


@pytest.fixture(scope="module")
def other_prepared(demo_assets, tmp_path_factory):
    """The demo data prepared for another model: the demo model's weights with a tokenizer of
    another vocabulary (the same ids mean other tokens)."""
    from qlora_kfp.app.demo import build_tokenizer
    from qlora_kfp.configs import PrepareConfig
    from qlora_kfp.stages.prepare import run_prepare

    root = tmp_path_factory.mktemp("other")
    other = root / "other-llama"
    shutil.copytree(demo_assets["base_model"], other, ignore=shutil.ignore_patterns("MANIFEST*"))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (other / f).unlink()
    build_tokenizer(["a smaller vocabulary of other words"] * 20, vocab_size=300).save_pretrained(
        other
    )
    cfg = PrepareConfig(
        data_source=demo_assets["data_source"], base_model=str(other), max_seq_length=256
    )
    return run_prepare(cfg, str(root / "dataset"))


def _refused(call, other_prepared) -> str:
    from qlora_kfp.errors import ProvenanceError

    with pytest.raises(ProvenanceError) as err:
        call()
    msg = str(err.value)
    assert "other-llama" in msg and "tiny-llama" in msg and "\n" not in msg, msg
    assert "another tokenizer" in msg
    return msg


STAGES = ["quantize", "train", "evaluate"]


@pytest.mark.parametrize("stage", STAGES, ids=[f"{s}-refuses-it" for s in STAGES])
def test_a_dataset_tokenized_for_another_model_is_refused(
    stage, demo_assets, quantized, prepared, other_prepared, tmp_path
):
    from qlora_kfp.configs import QuantizeConfig
    from qlora_kfp.stages.evaluate import run_evaluate
    from qlora_kfp.stages.quantize import run_quantize
    from qlora_kfp.stages.train import run_train

    out = str(tmp_path / "out")
    calls = {
        "quantize": lambda: run_quantize(
            QuantizeConfig(base_model=demo_assets["base_model"]), out, other_prepared.path
        ),
        "train": lambda: run_train(
            TrainConfig(max_steps=1), quantized.path, other_prepared.path, out
        ),
        "evaluate": lambda: run_evaluate(
            EvaluateConfig(eval_rows=4, num_generations=1, max_new_tokens=2),
            quantized.path,
            make_adapter(quantized, prepared, tmp_path / "adapter"),
            other_prepared.path,
            out,
        ),
    }
    _refused(calls[stage], other_prepared)
    assert not Path(out).exists()


def test_the_prepared_dataset_records_its_tokenizer(prepared, tokenizer):
    info = json.loads((Path(prepared.path) / "stats.json").read_text())
    assert info["tokenizer_fingerprint"] == artifacts.tokenizer_fingerprint(tokenizer)
