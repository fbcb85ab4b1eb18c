"""Damaged weights and unknown optimizers end in one line saying what to do, not a traceback.

(Full disks and read-only outputs: tests/storage/test_writes.py.)
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from qlora_kfp.configs import MergeConfig, QuantizeConfig, TrainConfig
from qlora_kfp.errors import ArtifactError, ConfigError
from qlora_kfp.storage.manifest import atomic_folder


@pytest.mark.parametrize(
    "name,message",
    [
        ("adamw_torch_fuse", "did you mean adamw_torch_fused?"),
        ("paged_adamw_32", "did you mean paged_adamw_32bit?"),
        ("sgdd", "did you mean sgd?"),
        ("no-such-thing-at-all", "use auto or a name of transformers' OptimizerNames"),
    ],
    ids=["missing-letter", "missing-suffix", "extra-letter", "nothing-close"],
)
def test_an_unknown_optimizer_names_the_closest(name, message):
    with pytest.raises(ConfigError) as got:
        TrainConfig(optimizer=name)
    assert str(got.value).startswith(f"optimizer={name!r} is invalid: ") and message in str(
        got.value
    )


@pytest.mark.parametrize("name", ["auto", "adamw_torch", "paged_adamw_32bit", "adafactor"])
def test_known_optimizers_pass(name):
    assert TrainConfig(optimizer=name).optimizer == name


def _truncate(f: Path) -> None:
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])  # a download or copy cut off halfway


def _bad_header_length(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[:8] = (2**40).to_bytes(8, "little")
    f.write_bytes(bytes(data))


def _bad_header_json(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[8:16] = b"\xff" * 8
    f.write_bytes(bytes(data))


def _base_copy(demo_assets, tmp_path: Path) -> Path:
    dest = tmp_path / "base"
    shutil.copytree(demo_assets["base_model"], dest)
    return dest


@pytest.mark.parametrize(
    "damage,message",
    [
        (_truncate, "truncated safetensors file"),
        (_bad_header_length, "its header is cut off"),
        (_bad_header_json, "its header is not a tensor table"),
    ],
    ids=["truncated", "header-length", "header-garbage"],
)
def test_a_damaged_base_model_is_named(demo_assets, tmp_path, damage, message):
    from qlora_kfp.stages.quantize import run_quantize

    base = _base_copy(demo_assets, tmp_path)
    damage(base / "model.safetensors")
    with pytest.raises(ArtifactError) as got:
        run_quantize(QuantizeConfig(base_model=str(base)), str(tmp_path / "q"))
    text = str(got.value)
    assert text.startswith(f"{base / 'model.safetensors'}: ") and message in text
    assert text.endswith("download or copy the model again") and "\n" not in text
    assert not got.value.retryable, "the same bytes are there on a KFP retry"


def test_a_missing_shard_is_named(demo_assets, tmp_path):
    from transformers import AutoModelForCausalLM

    from qlora_kfp.stages.quantize import run_quantize

    base = _base_copy(demo_assets, tmp_path)
    (base / "model.safetensors").unlink()
    AutoModelForCausalLM.from_pretrained(demo_assets["base_model"]).save_pretrained(
        base, max_shard_size="200KB"
    )
    shard = sorted(base.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ArtifactError, match=f"{shard}: missing \\(listed in model.safetensors"):
        run_quantize(QuantizeConfig(base_model=str(base)), str(tmp_path / "q"))


def test_a_damaged_quantized_model_says_rerun_quantize(quantized, prepared, tmp_path):
    from qlora_kfp.stages.train import run_train

    copy = tmp_path / "quantized"
    shutil.copytree(quantized.path, copy)
    _truncate(copy / "model.safetensors")
    with pytest.raises(ArtifactError) as got:
        run_train(TrainConfig(max_steps=1), str(copy), prepared.path, str(tmp_path / "a"))
    text = str(got.value)
    assert "model.safetensors does not match its checksum" in text and "truncated" in text
    assert text.endswith("re-run the quantize stage to write it again")


def test_a_damaged_adapter_says_rerun_train(demo_assets, tmp_path):
    import torch
    from safetensors.torch import save_file

    from qlora_kfp.stages.merge import run_merge

    adapter = tmp_path / "adapter"
    with atomic_folder(adapter, "adapter") as tmp:
        save_file({"w": torch.zeros(64, 64)}, tmp / "adapter_model.safetensors")
    _truncate(adapter / "adapter_model.safetensors")
    with pytest.raises(ArtifactError) as got:
        run_merge(
            MergeConfig(base_model=demo_assets["base_model"]), str(adapter), str(tmp_path / "m")
        )
    assert "adapter_model.safetensors does not match its checksum" in str(got.value)
    assert str(got.value).endswith("re-run the train stage to write it again")


def test_the_cli_prints_one_line(demo_assets, tmp_path, capsys):
    """What a user sees: the command's message, no traceback."""
    from qlora_kfp.app import cli

    base = _base_copy(demo_assets, tmp_path)
    _truncate(base / "model.safetensors")
    rc = cli.main(["quantize", "--base_model", str(base), str(tmp_path / "q")])
    err = capsys.readouterr().err
    assert rc == 2 and "truncated safetensors file" in err and "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert line.endswith("download or copy the model again")


def test_fingerprint_sources_fails_in_one_line(monkeypatch, capsys):
    """The fingerprint task lists s3:// sources: an unreachable endpoint is one line."""
    from qlora_kfp.tasks.bookkeeping_tasks import fingerprint_sources

    for key, value in {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",  # nothing listens there
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "x",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_MAX_ATTEMPTS": "1",
        "AWS_RETRY_MODE": "standard",
    }.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit, match=r"^fingerprint-sources failed: s3://data/train.jsonl"):
        fingerprint_sources({"data_source": "s3://data/train.jsonl", "base_model": "m"})
