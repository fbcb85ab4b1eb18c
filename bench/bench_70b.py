"""Llama-3.1-70B shapes on one GPU: the train stage on a 4-bit model built layer by layer.

Builds the random 4-bit checkpoint with ``build_4bit.py`` (no 16-bit checkpoint: it would
not fit the lent machine's disk), writes fixed 2,048-token rows, and runs the train stage
(``qlora_kfp.stages.train.run_train``, each variant in a fresh process) with LoRA r=16 on
every linear layer. Prints tokens/s over the steady steps, MFU (the baseline's formula:
4N a token plus attention, over 989 TFLOP/s), peak allocated and reserved GPU memory, the
memory setting the stage chose and its estimate against the measured peak; then the evaluate
stage on the first variant's adapter (``--evaluate``: its time and peak GPU memory). There is
no recipe run here (the seeds' recipe loads a 16-bit checkpoint), and no merge: the merge
reads the 16-bit base, 140 GB at 70B, over the lent machine's 64 GB disk.

Usage (GPU machine): python bench/bench_70b.py --steps 33 --warmup 3 \\
    --variants "auto-48gb:bs=1,pack=bins,pl=2048,fused=on,r=16,alpha=32,drop=0.05,gmem=48"
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]


def main() -> None:
    from build_4bit import build_artifact
    from train_bench import (
        OVERHEAD_GIB,
        SIZE_70B,
        _save,
        flops_per_token,
        parse_variant,
        print_table,
        rows_like_seed,
        run_evaluate_stage,
        run_variant,
        steady_steps,
        steady_tokens_per_s,
        step_times,
        window_tokens_per_s,
        write_dataset,
    )
    from transformers import LlamaConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=33, help="timed steps after warm-up")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--work", default="/tmp/bench70")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--keep", action="store_true", help="keep the 4-bit checkpoint afterwards")
    p.add_argument("--variants", nargs="*", required=True)
    p.add_argument("--tiny", action="store_true", help="a 2-layer model: a dry run on the CPU")
    p.add_argument(
        "--evaluate",
        type=int,
        default=4,
        help="then the evaluate stage on the first variant's adapter, with this many "
        "generations (0: skip): its time and peak GPU memory",
    )
    a = p.parse_args()
    shape = dict(SIZE_70B)
    if a.tiny:
        shape.update(hidden_size=256, intermediate_size=512, num_hidden_layers=2)
        shape.update(num_attention_heads=4, num_key_value_heads=2)

    work = Path(a.work)
    results: dict = {"setup": {}}
    model = work / "model4"
    if not (model / "MANIFEST.json").is_file():
        cfg = LlamaConfig(max_position_embeddings=8192, rope_theta=500000.0, **shape)
        results["setup"].update(build_artifact(cfg, model))
        print("built", json.dumps(results["setup"]), flush=True)
    t = time.perf_counter()
    most_bs = max(parse_variant(v)[1].get("batch_size", 1) for v in a.variants)
    # The 70B vocabulary is the 8B's: the same fixed rows.
    n = most_bs * (a.steps + a.warmup + 1)
    write_dataset(rows_like_seed("8b", "fixed", a.seq, n), work / "dataset")
    results["setup"]["dataset_s"] = round(time.perf_counter() - t, 1)
    _save(a.out, results)

    fpt = flops_per_token("70b", a.seq)
    table = []
    for spec in a.variants:
        name, kw = parse_variant(spec)
        kw.setdefault("optimizer", "auto")
        kw.setdefault("gradient_checkpointing_layers", "auto")
        kw.setdefault("gradient_checkpointing_offload", "auto")
        t = time.perf_counter()
        r = run_variant(kw, model, work / "dataset", work / f"adapter-{name}", a.steps + a.warmup)
        wall = round(time.perf_counter() - t, 1)
        if "error" in r:
            results[name] = {**r, "wall_s": wall}
            print(name, "FAILED", r["error"][-1500:], flush=True)
            _save(a.out, results)
            continue
        m = r["m"]
        tok_s = steady_tokens_per_s(r["h"], a.warmup)
        est = m.get("estimated_peak_gib")
        row = {
            "variant": name,
            **kw,
            "tokens_per_s": round(tok_s, 1),
            "window_tokens_per_s": window_tokens_per_s(r["h"], a.warmup),
            "steady_steps": steady_steps(r["h"], a.warmup),
            "ratio": None,
            "peak_gib": m.get("gpu_peak_gib"),
            "reserved_gib": m.get("gpu_reserved_gib"),
            "checkpointed_layers": m.get("checkpointed_layers"),
            "offload": m.get("checkpoint_offload"),
            "estimate_alloc_gib": round(est - OVERHEAD_GIB, 2) if est else None,
            "estimate_error": round((est - OVERHEAD_GIB) / m["gpu_peak_gib"] - 1, 4)
            if est and m.get("gpu_peak_gib")
            else None,
            "mfu_h100": round(fpt * tok_s / 989e12, 4),
            "first_losses": [h["loss"] for h in r["h"] if "loss" in h][:5],
            "step_times_s": step_times(r["h"]),
            "wall_s": wall,
        }
        results[name] = row
        table.append(row)
        print(name, json.dumps(row), flush=True)
        _save(a.out, results)
    if a.evaluate and table:
        name = table[0]["variant"]
        r = run_evaluate_stage(
            model, work / f"adapter-{name}", work / "dataset", work / "evaluation", a.evaluate
        )
        results["evaluate"] = {"adapter": name, **r}
        print("evaluate", json.dumps(results["evaluate"])[-2000:], flush=True)
        _save(a.out, results)
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    print_table({}, table)


if __name__ == "__main__":
    main()
    from qlora_kfp import fast_exit

    fast_exit.at_exit_leave()  # results written: no module teardown
