"""Where a QLoRA training step spends its GPU time: torch.profiler over a few steps.

Builds the model the way ``qlora_kfp.stages.train.run_train`` does (4-bit model, k-bit preparation,
LoRA on all linear layers, Liger when asked), runs plain forward / backward / clip / paged
AdamW steps on packed rows of random tokens, and prints per-step wall time, the GPU's busy
share (low means the step waits on Python and kernel launches) and the GPU time by kernel
family (NF4 dequantization, matrix multiplies, attention, optimizer, the rest).

Usage (GPU machine): python bench/profile_step.py --model /tmp/bench/model4 --rows 4 --seq 2048
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FAMILIES = [  # first match wins: cuDNN's attention kernel names contain "sm90" too
    ("nf4 dequantize", r"dequant|kDequantize"),
    ("attention", r"fmha|flash|attention|sdpa"),
    ("matmul", r"gemm|cutlass|xmma|nvjet|cublas|sm90|matmul"),
    ("optimizer", r"optimizer|adam|Adam"),
    ("liger / triton", r"liger|triton|_kernel$"),
]


def family(name: str) -> str:
    for label, pattern in FAMILIES:
        if re.search(pattern, name, re.IGNORECASE):
            return label
    return "elementwise / other"


def summarize(prof, wall: float, steps: int) -> dict:
    """GPU busy share, GPU time per step by kernel family, the top kernels and CPU ops."""
    by_family: dict[str, float] = {}
    top, cpu = [], []
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", 0) or getattr(ev, "cuda_time_total", 0)
        if ev.device_type.name == "CPU":
            cpu.append((ev.self_cpu_time_total, ev.count, ev.key[:90]))
        if ev.device_type.name != "CUDA" or not us:
            continue
        by_family[family(ev.key)] = by_family.get(family(ev.key), 0.0) + us
        top.append((us, ev.count, ev.key[:90]))
    busy = sum(by_family.values()) / 1e6
    return {
        "wall_s_per_step": round(wall / steps, 4),
        "gpu_busy_share": round(busy / wall, 3),
        "gpu_s_per_step_by_family": {
            k: round(v / 1e6 / steps, 4)
            for k, v in sorted(by_family.items(), key=lambda kv: -kv[1])
        },
        "top_kernels": [
            {"gpu_ms_per_step": round(us / 1e3 / steps, 2), "calls": n, "name": k}
            for us, n, k in sorted(top, reverse=True)[:15]
        ],
        "top_cpu_ops": [
            {"self_cpu_ms_per_step": round(us / 1e3 / steps, 2), "calls": n, "name": k}
            for us, n, k in sorted(cpu, reverse=True)[:12]
        ],
    }


def build(model_dir: str, fused: bool, gc: bool, r: int, upcast: bool, attn: str, lora: bool):
    """The train stage's model (``build_peft_model``), with Liger as the Trainer applies it."""
    from qlora_kfp.configs import TrainConfig
    from qlora_kfp.training.peft_model import build_peft_model

    cfg = TrainConfig(
        lora_r=r,
        lora_alpha=16,
        lora_dropout=0.1,
        gradient_checkpointing=gc,
        fp32_upcast=upcast,
        attn_implementation=attn,
        fused_lora=lora,
    )
    model = build_peft_model(cfg, model_dir)
    if fused:  # Trainer(use_liger_kernel=True) patches the base model under the adapters
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model.get_base_model())
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a quantized-model folder")
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--docs", type=int, default=1, help="documents per row (packed)")
    p.add_argument("--fused", type=int, default=1)
    p.add_argument("--gc", type=int, default=1)
    p.add_argument("--r", type=int, default=64)
    p.add_argument("--upcast", type=int, default=0, help="fp32_upcast (peft's float32 cast)")
    p.add_argument("--attn", default="auto", help="attn_implementation (auto: varlen on a GPU)")
    p.add_argument("--fused-lora", type=int, default=1, help="fused_lora (one addmm)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--profile-steps", type=int, default=2)
    p.add_argument("--out", default="")
    a = p.parse_args()

    import bitsandbytes as bnb
    import torch
    from torch.profiler import ProfilerActivity, profile

    from qlora_kfp.training.batching import collate_packed

    model = build(
        a.model, bool(a.fused), bool(a.gc), a.r, bool(a.upcast), a.attn, bool(a.fused_lora)
    )
    model.train()
    params = [q for q in model.parameters() if q.requires_grad]
    cuda = torch.cuda.is_available()  # the CPU runs only as a smoke test of this script
    opt = bnb.optim.PagedAdamW32bit(params, lr=2e-4) if cuda else torch.optim.AdamW(params)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    doc = a.seq // a.docs
    groups = [
        [
            {
                "input_ids": (ids := torch.randint(0, vocab, (doc,), generator=g).tolist()),
                "labels": ids,
            }
            for _ in range(a.docs)
        ]
        for _ in range(a.rows)
    ]
    dev = next(model.parameters()).device
    batch = {
        k: v.to(dev) if isinstance(v, torch.Tensor) else v
        for k, v in collate_packed(groups, pad_id=0).items()
    }
    tokens = a.rows * a.docs * doc

    def step():
        # What Trainer(bf16=True) does: autocast the forward; backward follows its dtypes.
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    times = []
    for _ in range(a.steps):
        sync()
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        sync()
        t = time.perf_counter()
        for _ in range(a.profile_steps):
            step()
        sync()
        wall = time.perf_counter() - t

    step_s = sorted(times[1:])[len(times[1:]) // 2]
    result = {
        "rows": a.rows,
        "seq": a.seq,
        "docs_per_row": a.docs,
        "fused": a.fused,
        "gc": a.gc,
        "upcast": a.upcast,
        "attn": a.attn,
        "fused_lora": a.fused_lora,
        "tokens_per_step": tokens,
        "step_s_median": round(step_s, 4),
        "tokens_per_s": round(tokens / step_s, 1),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        **summarize(prof, wall, a.profile_steps),
    }
    print("PROFILE " + json.dumps(result), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
