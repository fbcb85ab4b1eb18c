"""The whole qlora_finetune pipeline through kfp.local on a GPU machine, on 1B shapes.

KFP's own local runner (``kfp.local.SubprocessRunner``) runs every task as its own process from
the same component definitions that ``make compile`` writes to YAML, with MLflow on a local
SQLite store, as ``make run`` does on the CPU. The model is a Llama-3.2-1B-shaped random
checkpoint (16 layers, hidden 2,048, MLP 8,192) with the demo tokenizer; the data is the
demo's antonym task. Each stage logs its own wall time and peak memory (process RSS and GPU)
to its MLflow run; this script reads them back from the store and prints one row a stage.

Usage (GPU machine, see run_pipeline_gpu.sh for the wheels): python bench/pipeline_gpu.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE)]


def stage_usage(tracking_uri: str) -> tuple[list[dict], dict]:
    """Per-stage usage metrics of the newest pipeline run, and that parent run's metrics."""
    from mlflow.tracking import MlflowClient

    from qlora_kfp.tracking.report import STAGES

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name("qlora-finetune")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = {
        r.data.tags.get("stage"): r.data.metrics
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    rows = []
    for name in STAGES:
        m = children.get(name, {})
        rows.append(
            {
                "stage": name,
                "wall_s": m.get("stage_seconds"),
                "gpu_peak_gib": m.get("stage_gpu_peak_gib", 0.0),
                "gpu_reserved_gib": m.get("stage_gpu_reserved_gib", 0.0),
                "peak_rss_gib": m.get("stage_peak_rss_gib"),
            }
        )
    return rows, parent.data.metrics


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/pipeline-gpu")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--max-steps", type=int, default=60)
    p.add_argument("--hidden", type=int, default=2048, help="2048 with 16 layers: 1B shapes")
    p.add_argument("--layers", type=int, default=16)
    a = p.parse_args()

    import torch

    # The installed project first: gpu_stages puts the checkout on sys.path, whose qlora_kfp
    # folder has no pipelines/components subpackages (they install from the top-level folders).
    from qlora_kfp.app import local_runner
    from qlora_kfp.pipelines.qlora_finetune import qlora_finetune  # isort: skip
    from gpu_stages import build_assets  # isort: skip

    work = Path(a.work)
    local_runner.local_tracking_env(work)
    assets = build_assets(work, a.hidden, a.layers)
    params = {
        **local_runner.demo_params(),
        **assets,
        # The GPU image's defaults otherwise: bins of pack_length tokens, Liger, varlen.
        "packing": "bins",
        "batch_size": 8,
        "learning_rate": 1e-3,
        "max_steps": a.max_steps,
        "num_generations": 8,
        "max_new_tokens": 16,
        "gpu_memory_gib": (
            torch.cuda.get_device_properties(0).total_memory / 2**30
            if torch.cuda.is_available()
            else 80.0
        ),
        "run_name": f"gpu-{time.strftime('%H%M%S')}",
    }
    t0 = time.perf_counter()
    run_dir = local_runner.run_pipeline(qlora_finetune, params, work)
    total = round(time.perf_counter() - t0, 1)
    rows, parent = stage_usage(os.environ["MLFLOW_TRACKING_URI"])
    out = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "pipeline_seconds": total,
        "run_dir": str(run_dir),
        "params": params,
        "stages": rows,
        "parent_metrics": parent,
    }
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "pipeline_gpu.json").write_text(json.dumps(out, indent=1, default=str))
    print(f"\n{'stage':16s} {'wall s':>8s} {'GPU peak GiB':>13s} {'RSS GiB':>8s}")
    for r in rows:
        wall = f"{r['wall_s']:8.2f}" if r["wall_s"] is not None else f"{'-':>8s}"
        print(f"{r['stage']:16s} {wall} {r['gpu_peak_gib']:13.3f} {r['peak_rss_gib'] or 0:8.2f}")
    print(f"whole pipeline (kfp.local, every task its own process): {total} s")


if __name__ == "__main__":
    main()
