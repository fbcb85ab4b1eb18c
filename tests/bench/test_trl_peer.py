"""bench/trl_peer.py: TRL's SFTTrainer as the train stage's measured peer (``trainer=trl``).

A peer is worth comparing only if it trains the same model on the same tokens: on the same
rows, seed and LoRA shape, the stage and the peer must see the same batches (the same real
tokens each step), train as many LoRA weights, and log the same losses. The peer runs here on
the CPU on the demo model, through train_bench's own path (a fresh process per variant, the
row the table and bench_results.json get).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

# Without Liger (Triton) and TRL's activation offloading (CUDA streams) on the CPU: fused=off,
# off=off. lr=1e-2: the recipe's 2e-4 moves the loss too little in a few steps to compare.
CPU = "opt=adamw_torch,drop=0,r=8,fused=off,off=off,lr=1e-2"


def makefile_variants(name: str) -> dict[str, dict]:
    """The variants of one of the Makefile's argument variables, parsed."""
    from train_bench import parse_variant

    text = (ROOT / "Makefile").read_text()
    block = re.search(rf"^{name} = (.*?)\n(?!  )", text, re.S | re.M).group(1)
    return dict(parse_variant(s) for s in re.findall(r'"([^"]+)"', block))


def test_the_makefiles_trl_peers_are_their_stage_variants_in_trls_flags():
    """``make bench-mfu``'s trl- variants: each has its train-stage variant (the name after
    ``trl-`` ends it), with the same keys but ``trainer`` and the memory settings, which are
    the ones that variant resolves to (lowmem-bs8: every layer checkpointed and offloaded;
    auto-80gb-bs6 at 80 GB: none, as measured in session 9), and TRL takes them."""
    from train_bench import stage_config
    from trl_peer import trl_settings

    variants = makefile_variants("BENCH_MFU_ARGS")
    peers = {n: kw for n, kw in variants.items() if kw.get("trainer") == "trl"}
    assert set(peers) == {"trl-lowmem-bs8", "trl-80gb-bs6"}
    memory = {"gradient_checkpointing_layers", "gradient_checkpointing_offload", "gpu_memory_gib"}
    resolved = {"trl-lowmem-bs8": ("-1", "on"), "trl-80gb-bs6": ("0", "off")}
    for name, kw in peers.items():
        (stage,) = [n for n in variants if n != name and n.endswith(name.removeprefix("trl-"))]
        same = {k: v for k, v in variants[stage].items() if k not in memory}
        assert {k: v for k, v in kw.items() if k not in memory | {"trainer"}} == same, name
        got = (kw["gradient_checkpointing_layers"], kw["gradient_checkpointing_offload"])
        assert got == resolved[name]
        flags = trl_settings(kw, stage_config(kw, steps=33))
        assert flags["gradient_checkpointing"] == (name == "trl-lowmem-bs8")
        assert flags["activation_offloading"] == (name == "trl-lowmem-bs8")
        assert flags["packing"] and flags["packing_strategy"] == "bfd" and flags["padding_free"]
        assert flags["use_liger_kernel"]


@pytest.mark.parametrize(
    "spec, refused",
    [
        ("gcl=auto", "gcl=auto"),
        ("gcl=4", "gcl=4"),
        ("off=auto", "off=auto"),
        ("fl=1", "fused_lora"),
        ("up=1", "fp32_upcast"),
        ("gmem=80", "gpu_memory_gib"),
        ("np=2", "num_processes"),
    ],
)
def test_a_setting_trl_has_no_flag_for_is_refused(spec, refused):
    """A peer never silently measures something else than its variant asks."""
    from train_bench import parse_variant, stage_config
    from trl_peer import trl_settings

    _, kw = parse_variant(f"v:trainer=trl,bs=2,gcl=-1,off=off,{spec}")
    with pytest.raises(ValueError, match=re.escape(refused)):
        trl_settings(kw, stage_config(kw, steps=3))


@pytest.fixture(scope="module")
def bench_inputs(demo_assets, tmp_path_factory):
    """The bench's own artifacts on the demo model: its 4-bit model (train_bench.quantize)
    and a dataset of 16 token rows of 12 to 32 tokens (train_bench.write_dataset)."""
    import torch
    from train_bench import quantize, write_dataset

    pytest.importorskip("trl", reason="trl comes with the test extras (make install)")
    tmp = tmp_path_factory.mktemp("trl-peer")
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(12, 33, (16,), generator=g).tolist()
    rows = [torch.randint(3, 400, (n,), generator=g).tolist() for n in lengths]
    write_dataset(rows, tmp / "data")
    quantize(demo_assets["base_model"], tmp / "model4")
    return tmp


def _run(spec: str, tmp: Path, steps: int) -> tuple[dict, dict]:
    from train_bench import parse_variant, run_variant

    name, kw = parse_variant(spec)
    got = run_variant(kw, tmp / "model4", tmp / "data", tmp / f"out-{name}", steps=steps)
    assert "error" not in got, got.get("error")
    return kw, got


def _logged(got: dict, key: str) -> list[float]:
    return [h[key] for h in got["h"] if "loss" in h]


@pytest.mark.slow
def test_the_trl_peer_trains_end_to_end_and_shows_in_the_table(bench_inputs, capsys):
    """The GPU peers' path on the CPU: bins packed by TRL's BFD, every layer checkpointed,
    12 steps (three passes over the bins): a rate, a falling loss, and a row of the table."""
    from train_bench import print_table, variant_row

    spec = f"trl:trainer=trl,bs=2,pack=bins,pl=64,gcl=-1,steps=12,{CPU}"
    kw, got = _run(spec, bench_inputs, steps=12)
    m = got["m"]
    assert m["steps"] == 12 and m["loaded_in_4bit"] and m["checkpointed_layers"] > 0
    losses = _logged(got, "loss")
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 1.0, losses
    base = {"tokens_per_s": 10.0, "peak_gib": 1.0, "reserved_gib": 1.0, "mfu_h100": 0.1}
    row = variant_row("trl", kw, got, base, base_bs=2, warmup=1, fpt=1e9)
    assert row["tokens_per_s"] > 0 and row["steady_steps"] == 11
    # The row's rate is rounded to 0.1 token/s, its ratio is of the unrounded rate.
    assert row["ratio"] == pytest.approx(row["tokens_per_s"] / 10.0, abs=0.01)
    assert row["trainer"] == "trl" and row["trl_version"] and row["lora_dtype"] == "bfloat16"
    print_table(base, [row])
    assert re.search(r"^trl\s+[\d.]+\s+[\d.]+", capsys.readouterr().out, re.M)


@pytest.mark.slow
def test_the_trl_peer_and_the_train_stage_train_the_same_model_on_the_same_tokens(
    bench_inputs,
):
    """Same rows, seed, LoRA shape and optimizer; padding-free batches in the rows' order
    (group=0), no checkpointing, 4 steps; the stage with peft's own LoRA forward (fl=0).

    * Every step trains on the same real tokens, and both train as many LoRA weights.
    * Step 1's loss is the 4-bit model's own on the same batch (LoRA B starts at 0): equal to
      1e-5. Step 2's follows one AdamW step from the LoRA A init, so with TRL's LoRA weights
      kept in float32 as the stage keeps them (``lora32=1``) it is equal to 1e-4 (measured:
      5e-7), and step 1's gradient norms to 1e-5 relative: the same init, the same update.
    * Later steps drift apart by the rounding of the two loss computations (TRL's chunked
      fused LM head against transformers' loss, in a bfloat16 model), which AdamW's first
      steps amplify: measured at most 4e-3 (float32 LoRA) and 5e-3 (TRL's stock bfloat16
      LoRA weights), asserted below 2e-2.
    """
    common = f"bs=2,group=0,pack=padding_free,gcl=0,{CPU}"
    from train_bench import variant_row

    kw, stage = _run(f"stage:fl=0,{common}", bench_inputs, steps=4)
    base = {"tokens_per_s": 10.0, "peak_gib": 1.0, "reserved_gib": 1.0, "mfu_h100": 0.1}
    row = variant_row("stage", kw, stage, base, base_bs=2, warmup=1, fpt=1e9)
    # The stage's row says whether the allocator grew segments in place: the reading of a
    # gap between reserved and peak memory (the stage sets it before CUDA starts).
    assert row["expandable_segments"] == stage["m"]["expandable_segments"] in (0, 1)
    _, stock = _run(f"trl:trainer=trl,{common}", bench_inputs, steps=4)
    _, fp32 = _run(f"trl32:trainer=trl,lora32=1,{common}", bench_inputs, steps=4)
    assert stock["m"]["lora_dtype"] == "bfloat16" and fp32["m"]["lora_dtype"] == "float32"
    ours = _logged(stage, "loss")
    assert len(ours) == 4
    for peer in (stock, fp32):
        assert _logged(peer, "tokens_seen") == _logged(stage, "tokens_seen")
        assert peer["m"]["trainable_params"] == stage["m"]["trainable_params"]
        theirs = _logged(peer, "loss")
        assert len(theirs) == 4
        assert abs(theirs[0] - ours[0]) < 1e-5, (theirs, ours)
        assert max(abs(a - b) for a, b in zip(theirs, ours, strict=True)) < 2e-2, (theirs, ours)
    assert abs(_logged(fp32, "loss")[1] - ours[1]) < 1e-4, (_logged(fp32, "loss"), ours)
    gn_stage, gn_fp32 = _logged(stage, "grad_norm")[0], _logged(fp32, "grad_norm")[0]
    assert abs(gn_fp32 / gn_stage - 1) < 1e-5
