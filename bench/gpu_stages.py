"""Every stage once on the GPU, on a Llama-3.2-1B-shaped random model: wall time and peak memory.

The same library functions the KFP components call (prepare, quantize, train, evaluate,
merge), in order, each on the previous stage's artifact, with the GPU's peak memory reset
between stages. The model has 1B shapes (16 layers, hidden 2,048, MLP 8,192) and the demo
tokenizer's small vocabulary; the data is the demo's antonym task.

Usage (GPU machine, see run_device.sh for the wheels): python bench/gpu_stages.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build_assets(root: Path, hidden: int, layers: int) -> dict:
    """A 1B-shaped random Llama (bfloat16) with the demo tokenizer, and the demo data."""
    import torch

    from qlora_kfp.app import demo

    tiny = demo.make_demo_assets(root / "demo")
    model_dir = root / f"model-{hidden}x{layers}"
    if not (model_dir / "config.json").is_file():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tiny["base_model"])
        model = demo.build_model(
            len(tok),
            hidden,
            layers,
            intermediate_size=4 * hidden,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=2048,
            initializer_range=0.02,
        )
        model.to(torch.bfloat16).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
    return {"base_model": str(model_dir), "data_source": tiny["data_source"]}


def measured(name: str, fn, table: list[dict]):
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    result = fn()
    if cuda:
        torch.cuda.synchronize()
    row = {
        "stage": name,
        "wall_s": round(time.perf_counter() - t, 2),
        "gpu_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else 0.0,
    }
    table.append(row)
    print("STAGE " + json.dumps(row), flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/gpu-stages")
    p.add_argument("--out", default=".")
    p.add_argument("--max-steps", type=int, default=60)
    p.add_argument("--hidden", type=int, default=2048, help="2048 with 16 layers: 1B shapes")
    p.add_argument("--layers", type=int, default=16)
    a = p.parse_args()

    import torch

    from qlora_kfp.configs import (
        EvaluateConfig,
        MergeConfig,
        PrepareConfig,
        QuantizeConfig,
        TrainConfig,
    )
    from qlora_kfp.stages.evaluate import run_evaluate
    from qlora_kfp.stages.merge import run_merge
    from qlora_kfp.stages.prepare import run_prepare
    from qlora_kfp.stages.quantize import run_quantize
    from qlora_kfp.stages.train import run_train

    work = Path(a.work)
    assets = build_assets(work, a.hidden, a.layers)
    table: list[dict] = []
    base = assets["base_model"]
    data = measured(
        "prepare",
        lambda: run_prepare(
            PrepareConfig(data_source=assets["data_source"], base_model=base, max_seq_length=64),
            str(work / "dataset"),
        ),
        table,
    )
    quant = measured(
        "quantize",
        lambda: run_quantize(QuantizeConfig(base_model=base), str(work / "q4"), data.path),
        table,
    )
    train_cfg = TrainConfig(
        packing="bins",
        batch_size=8,
        learning_rate=1e-3,
        max_steps=a.max_steps,
        logging_steps=10,
        checkpoint_steps=20,
    )
    trained = measured(
        "train",
        lambda: run_train(train_cfg, quant.path, data.path, str(work / "adapter")),
        table,
    )
    evaluated = measured(
        "evaluate",
        lambda: run_evaluate(
            EvaluateConfig(num_generations=8, max_new_tokens=16),
            quant.path,
            trained.path,
            data.path,
            str(work / "eval"),
        ),
        table,
    )
    merged = measured(
        "merge",
        lambda: run_merge(MergeConfig(base_model=base), trained.path, str(work / "merged")),
        table,
    )
    out = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "stages": table,
        "quantize": quant.metrics,
        "train": trained.metrics,
        "evaluate": evaluated.metrics,
        "merge": merged.metrics,
    }
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "gpu_stages.json").write_text(json.dumps(out, indent=1, default=str))
    print(f"\n{'stage':10s} {'wall s':>8s} {'GPU peak GiB':>13s}")
    for row in table:
        print(f"{row['stage']:10s} {row['wall_s']:8.2f} {row['gpu_peak_gib']:13.3f}")


if __name__ == "__main__":
    main()
