"""bench/merge_bench.py on a tiny shape: the checkpoint it builds is one transformers loads, the
adapter one the merge stage takes, and each phase reports its time and peaks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # builds a checkpoint and trains a tokenizer: ~10 s on 2 busy cores

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from merge_bench import build_adapter, build_base

    root = tmp_path_factory.mktemp("merge-bench")
    base = build_base(root / "base", "tiny", shard_size="40KB")
    return root, base, build_adapter(base, root / "adapter", r=4, alpha=8)


def test_the_base_is_a_sharded_bfloat16_checkpoint(built):
    import torch
    from transformers import AutoModelForCausalLM

    _, base, _ = built
    assert len(list(base.glob("model-*.safetensors"))) > 2
    model = AutoModelForCausalLM.from_pretrained(base)
    assert model.dtype == torch.bfloat16 and model.config.hidden_size == 64
    assert model.model.norm.weight.eq(1).all()


@pytest.mark.parametrize("phase", ["stream", "stage"])
def test_each_phase_reports_time_and_peaks(built, phase):
    from merge_bench import measure

    root, base, adapter = built
    row = measure(phase, base, adapter, root / phase, memory_gib=0.0002)
    assert row["phase"] == phase and row["seconds"] >= 0.001
    assert 0 < row["peak_anon_gib"] <= row["peak_rss_gib"]
    if phase == "stream":
        assert row["result"] == {"merged_tensors": 14, "shards": 1}  # 2 layers x 7 linears
    else:
        assert row["result"]["merge_max_abs_diff"] == 0.0
        assert json.loads((root / phase / "merge.json").read_text())["merged_tensors"] == 14


def test_each_phase_runs_in_its_own_process_and_leaves_no_model_behind(built):
    from merge_bench import main

    root, _, _ = built
    rows = main(
        ["--size", "tiny", "--out", str(root), "--phases", "stream", "--shard-size", "40KB"]
    )
    assert [r["phase"] for r in rows] == ["stream"] and rows[0]["result"]["shards"] > 1
    assert not (root / "stream").exists()  # the next phase has the disk the stream used


def test_a_failed_phase_shows_its_own_error(built):
    from merge_bench import main

    root, _, _ = built
    with pytest.raises(SystemExit, match=r"phase stage failed:(.|\n)*merge_memory_gib"):
        main(["--size", "tiny", "--out", str(root), "--phases", "stage", "--memory-gib", "-1"])
