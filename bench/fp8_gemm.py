"""FP8 against bf16 for the frozen base matmuls of Llama-8B shapes, on one GPU.

The train stage's step is bound by its matrix multiplies (BENCHMARKS.md: 1.16 of 1.79 s at 8
bins with every layer recomputed), and those are the frozen base weights' products: forward,
recomputed forward and the input gradient. This measures, per Linear shape of Llama-3.1-8B at
``--tokens`` tokens, the bare products (bf16 against e4m3, ``training/fp8_base.py``'s casts
eager, compiled and ``fp8_kernels``' Triton kernel) and a bitsandbytes NF4 Linear's forward
and forward+input gradient as bitsandbytes runs it and through ``fp8_base`` (dequantization
and casts counted), and the weight's e4m3 cast through a bf16 copy against ``fp8_kernels``'
from the packed codes. It prints
a JSON record and the sum over a step of 32 checkpointed layers (forward, then forward and
backward again), with the CPU time to enqueue a forward+backward (``*_issue``: above the GPU
time, the loop is launch-bound) and the FP8 path's kernels by GPU time. ``--dry``: tiny
shapes on the CPU, to check the script itself.

Usage: python bench/fp8_gemm.py --out DIR [--tokens 16384]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SHAPES = {  # name: (out_features, in_features, count in a layer)
    "q_proj/o_proj": (4096, 4096, 2),
    "k_proj/v_proj": (1024, 4096, 2),
    "gate_proj/up_proj": (14336, 4096, 2),
    "down_proj": (4096, 14336, 1),
}


DEVICE = "cuda"


def timed(fn, reps: int = 20) -> float:
    """Mean milliseconds of ``fn`` over ``reps`` calls after three warm-ups (CUDA events)."""
    import torch

    if DEVICE == "cpu":
        import time

        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


PROFILES: dict = {}  # shape -> the FP8 path's kernels, GPU ms a forward+backward


def issue_ms(fn, reps: int = 10) -> float:
    """CPU milliseconds to enqueue one ``fn`` (no synchronisation inside the loop): above the
    GPU time, a loop of ``fn`` is bound by Python and launches, not by the GPU."""
    import time

    import torch

    if DEVICE == "cpu":
        return 0.0
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    elapsed = (time.perf_counter() - start) * 1e3 / reps
    torch.cuda.synchronize()
    return elapsed


def kernel_ms(fn, reps: int = 3) -> dict:
    """GPU milliseconds per call of each kernel ``fn`` launches (torch.profiler), largest
    first: where the FP8 path's time goes beside the product."""
    if DEVICE == "cpu":
        return {}
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
    rows = {}
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0)
        if us:
            rows[e.key[:80]] = round(us / 1e3 / reps, 4)
    return dict(sorted(rows.items(), key=lambda kv: -kv[1])[:12])


def gemms(n: int, k: int, tokens: int) -> dict:
    """Milliseconds of the bare products: bf16 against e4m3 with row scales (casts excluded)."""
    import torch

    from qlora_kfp.training import fp8_base

    x = torch.randn(tokens, k, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) * 0.02
    x8, xs = fp8_base.cast_rows(x)
    w8, ws = fp8_base.cast_rows(w)
    return {
        "gemm_bf16": timed(lambda: torch.nn.functional.linear(x, w)),
        "gemm_fp8": timed(lambda: fp8_base._matmul(x8, xs, w8, ws, torch.bfloat16)),
        "cast_eager": timed(lambda: fp8_base.cast_rows(x)),
        "cast_compiled": timed(lambda: fp8_base._compiled_cast()(x)),
        "cast_kernel": timed(lambda: fp8_base._cast(x)),
    }


def linear4bit(n: int, k: int, tokens: int) -> dict:
    """Milliseconds of a bitsandbytes NF4 Linear's forward, and forward plus input gradient,
    as bitsandbytes runs it and through ``fp8_base`` (the dequantization and casts counted)."""
    import bitsandbytes as bnb
    import torch

    from qlora_kfp.training import fp8_base, fp8_weights

    torch.manual_seed(0)
    lin = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    # A bfloat16 weight, as a model's: on a GPU only those multiply in FP8 (fp8_base.qualifies)
    w = (torch.randn(n, k) * 0.02).bfloat16()
    lin.weight = bnb.nn.Params4bit(
        w, requires_grad=False, quant_type="nf4", compress_statistics=True
    )
    lin = lin.to(DEVICE)
    x = torch.randn(tokens, k, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(tokens, n, device=DEVICE, dtype=torch.bfloat16)

    def fwd():
        return lin(x)

    def fwd_bwd():
        lin(x).backward(dy)

    out = {"bnb_forward": timed(fwd), "bnb_forward_backward": timed(fwd_bwd)}
    # The weight in e4m3: through a bf16 copy (as before), and from the packed codes.
    data, state = lin.weight.data, lin.weight.quant_state
    out["weight_via_bf16"] = timed(
        lambda: fp8_base._cast(bnb.functional.dequantize_4bit(data, state))
    )
    out["weight_packed"] = timed(lambda: fp8_weights.e4m3(data, state, kernel=DEVICE == "cuda"))
    out["bnb_issue"] = issue_ms(fwd_bwd)
    ref = lin(x).float()
    assert fp8_base.use_fp8(lin) == 1, "this Linear does not qualify for FP8 here"
    out["fp8_forward"] = timed(fwd)
    out["fp8_forward_backward"] = timed(fwd_bwd)
    out["fp8_issue"] = issue_ms(fwd_bwd)
    PROFILES[f"{n}x{k}"] = kernel_ms(fwd_bwd)
    got = lin(x).float()
    out["fp8_rel_err"] = ((got - ref).norm() / ref.norm()).item()
    return out


def measure(n: int, k: int, tokens: int) -> dict:
    """Both measures of one Linear shape, rounded."""
    out = {**gemms(n, k, tokens), **linear4bit(n, k, tokens)}
    return {key: round(v, 4) for key, v in out.items()}


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--dry", action="store_true", help="tiny shapes on the CPU")
    args = ap.parse_args()
    if args.dry:
        global DEVICE, SHAPES
        DEVICE, SHAPES, args.tokens = "cpu", {"tiny": (64, 128, 1)}, 48
    record = {
        "gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        "torch": torch.__version__,
        "shapes": {},
    }
    step = {"bnb": 0.0, "fp8": 0.0}
    for name, (n, k, count) in SHAPES.items():
        m = measure(n, k, args.tokens)
        record["shapes"][name] = m
        print(name, json.dumps(m), flush=True)
        # A checkpointed layer runs its forward twice (once again in the backward).
        for way in step:
            ms = m[f"{way}_forward"] + m[f"{way}_forward_backward"]
            step[way] += ms * count * args.layers
    record["step_ms"] = {k: round(v, 1) for k, v in step.items()}
    record["speedup"] = round(step["bnb"] / step["fp8"], 3)
    record["fp8_kernels_ms"] = PROFILES
    print("base Linears per step (ms):", json.dumps(record["step_ms"]), "x", record["speedup"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fp8_gemm.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
