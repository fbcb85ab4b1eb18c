"""The train stage on 1 and several GPUs of one machine side by side (``make bench-multi-gpu``).

``train_bench.py --nproc 1 2`` runs each variant once per process count (``num_processes``:
DDP, one process per GPU, the same per-GPU batch), named ``<variant>-np<N>``, and prints
tokens/s over every GPU, the largest per-GPU peak and the speed-up over the one-GPU run.
Perfect scaling is N; the goal for two GPUs is 1.85x. Tokens/s come from the logged rows,
which count rank 0's tokens times the ranks: exact on fixed-length bins, as here.
"""

from __future__ import annotations


def expand(variants: list[tuple[str, dict]], nprocs: list[int]) -> list[tuple[str, dict]]:
    """Each variant once per process count; unchanged without ``--nproc`` (the recipe's
    ``num_processes=1``, or the variant's ``np=``)."""
    if not nprocs:
        return variants
    return [(f"{name}-np{n}", {**kw, "num_processes": n}) for name, kw in variants for n in nprocs]


def scaling(table: list[dict]) -> list[dict]:
    """Per variant and process count: tokens/s, per-GPU peak and the ratio to one process."""
    by_name = {row["variant"]: row for row in table}
    out = []
    for row in table:
        n = row.get("num_processes", 1)
        base = by_name.get(row["variant"].rsplit("-np", 1)[0] + "-np1")
        ratio = None
        if base and base.get("tokens_per_s"):
            ratio = round(row["tokens_per_s"] / base["tokens_per_s"], 3)
        out.append(
            {
                "variant": row["variant"],
                "gpus": n,
                "tokens_per_s": row["tokens_per_s"],
                "tokens_per_s_per_gpu": round(row["tokens_per_s"] / n, 1),
                "per_gpu_peak_gib": row.get("peak_gib"),
                "per_gpu_reserved_gib": row.get("reserved_gib"),
                "speedup_vs_1gpu": ratio,
                "efficiency": round(ratio / n, 3) if ratio else None,
            }
        )
    return out


def print_scaling(rows: list[dict]) -> None:
    print(
        f"\n{'variant':26s} {'GPUs':>4s} {'tok/s':>9s} {'tok/s/GPU':>9s} {'peak GiB':>9s} "
        f"{'rsv GiB':>8s} {'x 1 GPU':>7s}"
    )
    for r in rows:
        print(
            f"{r['variant']:26s} {r['gpus']:4d} {r['tokens_per_s']:9.1f} "
            f"{r['tokens_per_s_per_gpu']:9.1f} {r['per_gpu_peak_gib'] or 0:9.2f} "
            f"{r['per_gpu_reserved_gib'] or 0:8.2f} {r['speedup_vs_1gpu'] or 0:7.3f}"
        )
