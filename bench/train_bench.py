"""Train-stage throughput against the seeds' recipe, side by side in one process tree.

Runs on a GPU machine (see bench/run_device.sh): builds the random Llama checkpoint of
``seed_recipe.py``, runs the baseline (seed_recipe.py as is), quantizes the same checkpoint
with the project's code, then runs the project's train stage (``qlora_kfp.stages.train.run_train``)
on the same rows for each variant, and prints non-padding tokens/s, peak GPU memory, MFU and
the ratio to the baseline. Rows, LoRA shape (r=64, alpha=16, dropout 0.1, all linear layers),
optimizer (paged AdamW 32-bit), learning rate and clipping are the baseline's.

Usage: python bench/train_bench.py --size 8b --data chat --bs 8 --steps 20 --warmup 3 \
           --variants "grouped:bs=8" "grouped+liger:bs=8,fused=on"
       (``--nproc 1 2``: each variant on 1 and 2 GPUs, DDP; see multi_gpu.py)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
OVERHEAD_GIB = 1.0  # qlora_kfp.training.memory.OVERHEAD_GIB: the estimate's CUDA context


def rows_like_seed(size: str, data: str, seq: int, n: int) -> list[list[int]]:
    """The exact token rows seed_recipe.py trains on (same seeds, same length draw)."""
    import torch
    from seed_recipe import SIZES

    g = torch.Generator().manual_seed(1)
    vocab = SIZES[size]["vocab_size"]
    if data == "fixed":
        lens = [seq] * n
    else:
        ln = torch.distributions.LogNormal(torch.tensor(256.0).log(), torch.tensor(0.8))
        torch.manual_seed(1)
        lens = ln.sample((n,)).clamp(32, seq).long().tolist()
    return [torch.randint(0, vocab, (length,), generator=g).tolist() for length in lens]


def write_dataset(rows: list[list[int]], folder: Path) -> None:
    """A prepared-dataset artifact holding the rows (labels = inputs, like the baseline)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from qlora_kfp.app.demo import build_tokenizer
    from qlora_kfp.storage.artifacts import write_dataset_record
    from qlora_kfp.storage.manifest import atomic_folder

    with atomic_folder(folder, "dataset") as tmp:
        for name, part in (("train", rows), ("eval", rows[:8])):
            pq.write_table(
                pa.table(
                    {
                        "input_ids": part,
                        "labels": part,
                        "prompt": [""] * len(part),
                        "reference": [""] * len(part),
                    }
                ),
                tmp / f"{name}.parquet",
            )
        # Only padding uses the tokenizer: pad id 2 exists in every vocabulary here.
        tok = build_tokenizer(["a b c"], vocab_size=300)
        tok.save_pretrained(tmp / "tokenizer")
        # The stages check a model's tokenizer against the one the rows were made with: the
        # models the benchmarks build carry this same tokenizer.
        write_dataset_record(tmp, tok, {"base_model": "benchmark token rows"})


def quantize(checkpoint: str, out: Path) -> float:
    """The quantize stage's loading and saving path, without its 16-bit comparisons."""
    import torch

    from qlora_kfp.app.demo import build_tokenizer
    from qlora_kfp.storage.artifacts import write_quantize_record
    from qlora_kfp.storage.fingerprint import model_fingerprint
    from qlora_kfp.storage.manifest import atomic_folder
    from qlora_kfp.training import modeling

    t = time.perf_counter()
    model = modeling.load_model(
        checkpoint,
        dtype=torch.bfloat16,
        quantization_config=modeling.bnb_config("nf4", True, "bfloat16"),
    )
    with atomic_folder(out, "quantized-model") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        build_tokenizer(["a b c"], vocab_size=300).save_pretrained(tmp)
        # The train stage reads what the model was made from, as from the quantize stage's.
        write_quantize_record(tmp, {"base_model": checkpoint}, model_fingerprint(checkpoint))
    del model
    torch.cuda.empty_cache()
    return time.perf_counter() - t


# Llama-3.1-70B shapes (seed_recipe.py stays the seeds' file, so its table has no 70b).
SIZE_70B = dict(
    hidden_size=8192,
    intermediate_size=28672,
    num_hidden_layers=80,
    num_attention_heads=64,
    num_key_value_heads=8,
    vocab_size=128256,
)


def flops_per_token(size: str, seq: int) -> float:
    """The baseline's model-FLOPs count: 4N per token plus attention (no recompute)."""
    from seed_recipe import SIZES

    c = SIZE_70B if size == "70b" else SIZES[size]
    L, H, inter, V = (
        c["num_hidden_layers"],
        c["hidden_size"],
        c["intermediate_size"],
        c["vocab_size"],
    )
    kv = c["num_key_value_heads"] * (H // c["num_attention_heads"])
    n = L * (2 * H * H + 2 * H * kv + 3 * H * inter) + H * V
    return 4 * n + 3 * (L * 2 * 2 * seq * H)


VARIANT_KEYS = {
    "bs": ("batch_size", int),
    "gc": ("gradient_checkpointing", lambda v: v == "1"),
    "gcl": ("gradient_checkpointing_layers", str),
    "off": ("gradient_checkpointing_offload", str),
    "gmem": ("gpu_memory_gib", float),
    "drop": ("lora_dropout", float),
    "r": ("lora_r", int),
    "alpha": ("lora_alpha", int),
    "steps": ("max_steps", int),
    "fused": ("fused_kernels", str),
    "group": ("length_grouping", lambda v: v == "1"),
    "ga": ("gradient_accumulation_steps", int),
    "pack": ("packing", str),
    "pl": ("pack_length", int),
    "attn": ("attn_implementation", str),
    "up": ("fp32_upcast", lambda v: v == "1"),
    "fl": ("fused_lora", lambda v: v == "1"),
    "fp8": ("fp8_base", str),
    "opt": ("optimizer", str),
    "np": ("num_processes", int),
    "lr": ("learning_rate", float),
    # TRL's SFTTrainer as the peer of the same variant (trl_peer.py); "stage" by default.
    "trainer": ("trainer", str),
    "lora32": ("lora_fp32", lambda v: v == "1"),  # trainer=trl only (trl_peer.py)
}


def parse_variant(spec: str) -> tuple[str, dict]:
    name, _, opts = spec.partition(":")
    kw = {}
    for item in filter(None, opts.split(",")):
        key, _, value = item.partition("=")
        field, conv = VARIANT_KEYS[key]
        kw[field] = conv(value)
    return name, kw


def stage_config(kw: dict, steps: int) -> dict:
    """TrainConfig fields of a variant: the baseline's recipe, overridden by the variant's keys."""
    recipe = dict(
        lora_r=64,
        lora_alpha=16,
        lora_dropout=0.1,
        target_modules="all-linear",
        learning_rate=2e-4,
        lr_scheduler="constant",
        warmup_ratio=0.0,
        max_grad_norm=0.3,
        optimizer="paged_adamw_32bit",
        logging_steps=1,
        # Bins: one pass over the rows (their count of steps follows from the packing).
        max_steps=0 if kw.get("packing") == "bins" else steps,
        # The recipe's explicit setting; variants say gcl=auto to get the stage's default.
        gradient_checkpointing_layers="-1",
        gradient_checkpointing_offload="off",
        num_epochs=1.0,
        checkpoint_steps=0,
        eval_steps=0,
        compute_dtype="bfloat16",
        seed=1,
        # One GPU unless asked (np=, --nproc): the stage's 0 would take every visible GPU.
        num_processes=1,
    )
    return {**recipe, **kw}


def run_variant(kw: dict, model_dir: Path, data_dir: Path, out: Path, steps: int) -> dict:
    """One train-stage run in a fresh process, so its peak memory is its own.

    ``trainer=trl``: TRL's SFTTrainer on the same recipe and keys instead (trl_peer.py), also
    in a fresh process, returning the same ``{"m": metrics, "h": logged rows}``.
    """
    trainer = kw.get("trainer", "stage")
    own = {k: v for k, v in kw.items() if k not in ("trainer", "lora_fp32")}
    if trainer == "trl":
        arg = dict(kw=kw, cfg=stage_config(own, steps), model_dir=str(model_dir))
        arg.update(data_dir=str(data_dir), out=str(out))
        cmd = [sys.executable, str(HERE / "trl_peer.py"), json.dumps(arg)]
    elif trainer == "stage":
        cfg = stage_config(own, steps)
        code = (
            "import json,sys; from qlora_kfp.configs import TrainConfig; "
            "from qlora_kfp.stages.train import run_train; "
            f"r = run_train(TrainConfig(**{cfg!r}), {str(model_dir)!r}, {str(data_dir)!r}, "
            f"{str(out)!r}); print('RESULT ' + json.dumps({{'m': r.metrics, 'h': r.history}})); "
            "from qlora_kfp import fast_exit; fast_exit.at_exit_leave()"
        )
        cmd = [sys.executable, "-c", code]
    else:
        return {"error": f"trainer={trainer}: stage (the default) or trl"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    result = last_json(proc.stdout, "RESULT ")
    if proc.returncode or result is None:
        return {"error": proc.stderr[-2000:]}
    return result


def run_evaluate_stage(
    model_dir: Path, adapter_dir: Path, data_dir: Path, out: Path, generations: int = 4
) -> dict:
    """The evaluate stage on a benchmark's adapter, in a fresh process: its wall time, peak
    GPU memory (allocated) and metrics, or ``{"error": ...}``."""
    cfg = dict(num_generations=generations, max_new_tokens=16)
    code = (
        "import json, time, torch; from qlora_kfp.configs import EvaluateConfig; "
        "from qlora_kfp.stages.evaluate import run_evaluate; t = time.perf_counter(); "
        f"r = run_evaluate(EvaluateConfig(**{cfg!r}), {str(model_dir)!r}, {str(adapter_dir)!r}, "
        f"{str(data_dir)!r}, {str(out)!r}); "
        "peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None; "
        "print('RESULT ' + json.dumps({'seconds': round(time.perf_counter() - t, 1), "
        "'gpu_peak_gib': peak and round(peak, 2), 'metrics': r.metrics})); "
        "from qlora_kfp import fast_exit; fast_exit.at_exit_leave()"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env())
    result = last_json(proc.stdout, "RESULT ")
    if proc.returncode or result is None:
        return {"error": proc.stderr[-2000:]}
    return result


def last_json(stdout: str, tag: str, keep_tag: bool = False):
    """The JSON on the last line of ``stdout`` that starts with ``tag`` (or None).

    ``keep_tag``: the tag is the JSON's own start (seed_recipe.py prints a bare ``{...}``).
    """
    lines = [ln for ln in stdout.splitlines() if ln.startswith(tag)]
    if not lines:
        return None
    return json.loads(lines[-1] if keep_tag else lines[-1][len(tag) :])


def _save(out: str, results: dict) -> None:
    """Written after every run, so a call cut off at its time limit still returns results."""
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "bench_results.json").write_text(json.dumps(results, indent=1))


def _env() -> dict:
    path = os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path}


def loss_agreement(base: list[float], ours: list[float]) -> dict:
    """Step-by-step loss differences over the steps both runs logged."""
    n = min(len(base), len(ours))
    if not n:
        return {}
    diffs = [abs(a - b) for a, b in zip(base[:n], ours[:n], strict=True)]
    return {
        "steps_compared": n,
        "max_abs_diff": round(max(diffs), 5),
        "mean_abs_diff": round(sum(diffs) / n, 5),
        "max_rel_diff": round(max(d / abs(a) for d, a in zip(diffs, base, strict=False)), 6),
    }


def step_times(history: list[dict]) -> list[float]:
    """Seconds between consecutive logged steps (the bench logs every step)."""
    t = [h["time_s"] for h in history if "loss" in h and "time_s" in h]
    return [round(b - a, 3) for a, b in zip(t[:-1], t[1:], strict=True)]


def steady_tokens_per_s(history: list[dict], warmup: int) -> float:
    rows = [h for h in history if "loss" in h and "time_s" in h]
    a = next(h for h in rows if h["step"] >= warmup)
    b = rows[-1]
    return (b["tokens_seen"] - a["tokens_seen"]) / (b["time_s"] - a["time_s"])


def window_tokens_per_s(history: list[dict], warmup: int, windows: int = 3) -> list[float]:
    """Tokens/s of ``windows`` consecutive, equally long stretches of the steady steps."""
    rows = [h for h in history if "loss" in h and "time_s" in h and h["step"] >= warmup]
    size = (len(rows) - 1) // windows
    if size < 1:
        return []
    out = []
    for w in range(windows):
        a, b = rows[w * size], rows[(w + 1) * size]
        out.append(round((b["tokens_seen"] - a["tokens_seen"]) / (b["time_s"] - a["time_s"]), 1))
    return out


def steady_steps(history: list[dict], warmup: int) -> int:
    return sum(1 for h in history if "loss" in h and h["step"] > warmup)


def variant_row(
    name: str, kw: dict, r: dict, base: dict, base_bs: int, warmup: int, fpt: float
) -> dict:
    """A variant's row of the table and bench_results.json, from its run's ``{"m", "h"}``
    (a train-stage run's or a TRL peer's: the same figures, computed the same way).

    ``base``: the baseline's figures; ``base_bs``, ``warmup``: its batch size and warm-up
    steps (a variant of another batch size skips as many rows); ``fpt``: model FLOPs a token.
    """
    bs = kw.get("batch_size", 4)
    warm = max(warmup, warmup * base_bs // bs)
    tok_s = steady_tokens_per_s(r["h"], warm)
    m = r["m"]
    losses = [h["loss"] for h in r["h"] if "loss" in h]
    est = m.get("estimated_peak_gib")
    alloc_est = round(est - OVERHEAD_GIB, 2) if est else None
    row = {
        "variant": name,
        **kw,
        "tokens_per_s": round(tok_s, 1),
        "window_tokens_per_s": window_tokens_per_s(r["h"], warm),
        "steady_steps": steady_steps(r["h"], warm),
        "ratio": round(tok_s / base["tokens_per_s"], 3) if "tokens_per_s" in base else None,
        "peak_gib": m.get("gpu_peak_gib"),
        "reserved_gib": m.get("gpu_reserved_gib"),
        # where the reserve sits at the end: the compute stream's pools, other streams'
        "reserved_parts_gib": {
            k: m[f"gpu_reserved_{k}_gib"]
            for k in ("large_pool", "small_pool", "side_streams")
            if f"gpu_reserved_{k}_gib" in m
        },
        # whether the allocator grew segments in place (the gap between reserved and peak)
        "expandable_segments": m.get("expandable_segments"),
        "checkpointed_layers": m.get("checkpointed_layers"),
        "offload": m.get("checkpoint_offload"),
        "estimate_alloc_gib": alloc_est,
        "estimate_error": round(alloc_est / m["gpu_peak_gib"] - 1, 4)
        if alloc_est and m.get("gpu_peak_gib")
        else None,
        # Per GPU: tokens/s counts every process's GPU.
        "mfu_h100": round(fpt * tok_s / 989e12 / kw.get("num_processes", 1), 4),
        "first_losses": losses[:5],
        "step_times_s": step_times(r["h"]),
    }
    # A TRL peer's own settings: its version, the LoRA weights' dtype, the attention kernel.
    row.update({k: m[k] for k in ("trl_version", "lora_dtype", "attn_implementation") if k in m})
    if bs == base_bs and not kw.get("length_grouping", True):
        # Same rows in the same batches as the baseline: the losses must agree step by step.
        row["losses"] = losses
        row["loss_agreement"] = loss_agreement(base.get("losses", []), losses)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="8b", choices=["8b", "1b"])
    p.add_argument("--data", default="chat", choices=["chat", "fixed"])
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--bs", type=int, default=8, help="baseline batch size")
    p.add_argument("--steps", type=int, default=20, help="timed steps after warm-up")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--ckpt", default="/tmp/ckpt")
    p.add_argument("--work", default="/tmp/bench")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--variants", nargs="*", default=["grouped:bs=8"])
    p.add_argument(
        "--profiles",
        nargs="*",
        default=[],
        help='profile_step.py argument strings, e.g. "--rows 4 --seq 2048 --fused 1"',
    )
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument(
        "--nproc",
        type=int,
        nargs="*",
        default=[],
        help="run each variant once per process count (DDP, one process per GPU), e.g. 1 2",
    )
    p.add_argument(
        "--rows",
        type=int,
        default=0,
        help="rows the variants train on (0: the baseline's); packing shortens a run, and "
        "every figure needs >= 30 steady steps",
    )
    a = p.parse_args()

    import multi_gpu
    from seed_recipe import make_checkpoint

    work = Path(a.work)
    checkpoint = f"{a.ckpt}-{a.size}"
    t = time.perf_counter()
    make_checkpoint(a.size, checkpoint)
    results = {"setup": {"make_checkpoint_s": round(time.perf_counter() - t, 1)}}

    base_cmd = [
        sys.executable,
        str(HERE / "seed_losses.py"),
        "--size",
        a.size,
        "--data",
        a.data,
        "--seq",
        str(a.seq),
        "--bs",
        str(a.bs),
        "--steps",
        str(a.steps),
        "--warmup",
        str(a.warmup),
        "--ckpt",
        a.ckpt,
    ]
    if a.skip_baseline:
        base_cmd = [sys.executable, "-c", "print('{}')"]
    proc = subprocess.run(base_cmd, capture_output=True, text=True, env=_env())
    base = last_json(proc.stdout, "{", keep_tag=True) if proc.returncode == 0 else None
    base = base if base is not None else {"error": proc.stderr[-2000:]}
    base["losses"] = [loss for _, loss in last_json(proc.stdout, "LOSSES ") or []]
    results["baseline"] = base
    _save(a.out, results)
    print("baseline", json.dumps(base), flush=True)

    # The baseline's rows, for variants on its very batches (the sampler's order depends on
    # the row count); packed variants may take more (--rows) to reach 30 steady steps.
    n = a.bs * (a.steps + a.warmup + 2)
    write_dataset(rows_like_seed(a.size, a.data, a.seq, n), work / "dataset")
    more = work / "dataset"
    if a.rows > n:
        more = work / "dataset-more"
        write_dataset(rows_like_seed(a.size, a.data, a.seq, a.rows), more)
    results["setup"]["quantize_s"] = round(quantize(checkpoint, work / "model4"), 1)

    fpt = flops_per_token(a.size, a.seq)
    table = []
    for name, kw in multi_gpu.expand([parse_variant(s) for s in a.variants], a.nproc):
        bs = kw.get("batch_size", 4)
        steps = (a.steps + a.warmup) * a.bs // bs  # the same rows as the baseline
        data = more if kw.get("packing") == "bins" else work / "dataset"
        r = run_variant(kw, work / "model4", data, work / f"adapter-{name}", steps)
        if "error" in r:
            results[name] = r
            print(name, "FAILED", r["error"][-800:], flush=True)
            continue
        row = variant_row(name, kw, r, base, a.bs, a.warmup, fpt)
        results[name] = row
        table.append(row)
        print(name, json.dumps(row), flush=True)
        _save(a.out, results)

    for spec in a.profiles:
        cmd = [sys.executable, str(HERE / "profile_step.py"), "--model", str(work / "model4")]
        proc = subprocess.run([*cmd, *spec.split()], capture_output=True, text=True, env=_env())
        prof = last_json(proc.stdout, "PROFILE ") or {"error": proc.stderr[-1500:]}
        results.setdefault("profiles", []).append({"args": spec, **prof})
        print("profile", spec, json.dumps(prof), flush=True)
        _save(a.out, results)

    print_table(base, table)
    if a.nproc:
        results["scaling"] = multi_gpu.scaling(table)
        _save(a.out, results)
        multi_gpu.print_scaling(results["scaling"])


def print_table(base: dict, table: list[dict]) -> None:
    print(
        f"\n{'variant':22s} {'tok/s':>9s} {'x base':>7s} {'peak GiB':>9s} {'rsv GiB':>8s} "
        f"{'MFU':>6s} {'ckpt':>4s} {'off':>3s} {'est err':>7s} {'steps':>5s}"
    )
    if "tokens_per_s" in base:
        print(
            f"{'baseline (seed recipe)':22s} {base['tokens_per_s']:9.1f} {1.0:7.2f} "
            f"{base['peak_gib']:9.2f} {base['reserved_gib']:8.2f} {base['mfu_h100']:6.3f}"
        )
    for row in table:
        err = row.get("estimate_error")
        print(
            f"{row['variant']:22s} {row['tokens_per_s']:9.1f} {row['ratio'] or 0:7.2f} "
            f"{row['peak_gib'] or 0:9.2f} {row['reserved_gib'] or 0:8.2f} {row['mfu_h100']:6.3f} "
            f"{row.get('checkpointed_layers', -1):4d} {row.get('offload') or 0:3d} "
            f"{(err or 0) * 100:+6.1f}% {row.get('steady_steps', 0):5d}"
        )


if __name__ == "__main__":
    main()
    from qlora_kfp import fast_exit

    fast_exit.at_exit_leave()  # results written: no module teardown
