"""Issue 23, "silently wrong": inputs that ran to rc 0 with wrong results now stop in one line.

Stage tests here build what they need by hand (an adapter without training, a model with
another tokenizer), so they run with the fast tests; each case would have finished before.
"""

from __future__ import annotations

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
