"""The merge stage on a random bfloat16 checkpoint of Llama-3.1-8B shapes: time and peak memory.

Builds, without any model in memory, a 16-bit base of random weights (16 GB for 8B shapes,
written shard by shard) and a random LoRA adapter artifact on it (all linear layers, r=16),
then runs, each in its own process so that each peak is its own:

* ``stream``: the shard-by-shard merge alone (``merge_shards.merge_to_folder``);
* ``stage``: the whole merge stage (``run_merge``: merge, then the logit check within
  ``--memory-gib``).

Each prints one JSON line: seconds, peak RSS and peak anonymous memory (GiB; see
:class:`AnonPeak`) and, on a GPU, peak allocated GPU memory.

Usage (GPU machine): python bench/merge_bench.py --size 8b --out /tmp/merge8b --memory-gib 20
(``--size 1b --shard-size 500MB`` is a run a CPU machine can do.)
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]

SIZES = {
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
    "1b": dict(  # Llama-3.2-1B, untied head: a CPU-sized run
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
    ),
}


def build_base(out: Path, size: str, shard_size: str = "5GB", seed: int = 0) -> Path:
    """A random bfloat16 Llama checkpoint of ``size`` shapes, written one shard at a time
    (normal(0, 0.02) weights, ones for norms; the model itself is built on the meta device)."""
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SIZES[size], dtype="bfloat16", tie_word_embeddings=False)
    with torch.device("meta"):
        shapes = {k: v.to(torch.bfloat16) for k, v in LlamaForCausalLM(config).state_dict().items()}
    split = split_torch_state_dict_into_shards(shapes, max_shard_size=shard_size)
    gen = torch.Generator().manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    for filename, names in split.filename_to_tensors.items():
        shard = {}
        for name in names:
            shape = shapes[name].shape
            if name.endswith("norm.weight"):
                shard[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                shard[name] = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        save_file(shard, str(out / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(out)
    return out


def build_adapter(base: Path, out: Path, r: int = 16, alpha: int = 32, seed: int = 1) -> Path:
    """A random adapter artifact (LoRA on every linear layer of the decoder) with the demo
    tokenizer (the probe inputs need one; its ids are valid for any larger vocabulary)."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from qlora_kfp.app.demo import build_tokenizer, demo_rows
    from qlora_kfp.storage.manifest import write_manifest

    cfg = AutoConfig.from_pretrained(base)
    head = cfg.hidden_size // cfg.num_attention_heads
    shapes = {  # module -> (in, out)
        "self_attn.q_proj": (cfg.hidden_size, cfg.hidden_size),
        "self_attn.k_proj": (cfg.hidden_size, cfg.num_key_value_heads * head),
        "self_attn.v_proj": (cfg.hidden_size, cfg.num_key_value_heads * head),
        "self_attn.o_proj": (cfg.hidden_size, cfg.hidden_size),
        "mlp.gate_proj": (cfg.hidden_size, cfg.intermediate_size),
        "mlp.up_proj": (cfg.hidden_size, cfg.intermediate_size),
        "mlp.down_proj": (cfg.intermediate_size, cfg.hidden_size),
    }
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg.num_hidden_layers):
        for module, (fan_in, fan_out) in shapes.items():
            key = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn((r, fan_in), generator=gen) / fan_in**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn((fan_out, r), generator=gen) * 1e-3
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    targets = sorted({m.split(".")[-1] for m in shapes})
    LoraConfig(
        r=r, lora_alpha=alpha, target_modules=targets, task_type="CAUSAL_LM"
    ).save_pretrained(out)
    texts = [row["instruction"] + " " + row["output"] for row in demo_rows()]
    build_tokenizer(texts).save_pretrained(out)
    (out / "train.json").write_text(json.dumps({"base_model": str(base)}))
    write_manifest(out, "adapter")
    return out


class AnonPeak:
    """The process's peak anonymous memory (``RssAnon``, sampled every 10 ms, GiB). Peak RSS
    also counts the checkpoint pages the loaders memory-map: page cache the kernel can drop,
    as large as the files read."""

    def __init__(self) -> None:
        import threading

        self.peak = 0
        threading.Thread(target=self._sample, daemon=True).start()

    @staticmethod
    def now() -> int:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) << 10 for ln in f if ln.startswith("RssAnon:"))

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, self.now())
            time.sleep(0.01)


def measure(
    phase: str, base: Path, adapter: Path, out: Path, memory_gib: float, shard_size: str = ""
) -> dict:
    """Run ``phase`` (stream or stage) in this process; its time and peaks. ``shard_size``
    replaces the stage's output shard size (``manifest.SHARD_SIZE``, 5 GB)."""
    import shutil

    import peft  # noqa: F401 - imported before the clock starts: not the merge's time
    import torch

    from qlora_kfp.configs import MergeConfig
    from qlora_kfp.stages.merge import run_merge
    from qlora_kfp.storage import manifest
    from qlora_kfp.training.merge_shards import merge_to_folder

    manifest.SHARD_SIZE = shard_size or manifest.SHARD_SIZE
    shutil.rmtree(out, ignore_errors=True)
    anon = AnonPeak()
    start = time.perf_counter()
    if phase == "stream":
        out.mkdir(parents=True)
        result = merge_to_folder(str(base), str(adapter), out, "bfloat16", manifest.SHARD_SIZE)
    else:
        cfg = MergeConfig(base_model=str(base), merge_memory_gib=memory_gib)
        result = run_merge(cfg, str(adapter), str(out)).metrics
    row = {
        "phase": phase,
        "seconds": round(time.perf_counter() - start, 3),
        # ru_maxrss is in KiB on Linux: the process's peak resident memory.
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "peak_anon_gib": round(max(anon.peak, anon.now()) / 2**30, 3),
        "base_gib": round(sum(f.stat().st_size for f in base.glob("*.safetensors")) / 2**30, 3),
        "shard_size": manifest.SHARD_SIZE,
        "result": result,
    }
    if torch.cuda.is_available():
        row["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="8b")
    p.add_argument("--out", required=True)
    p.add_argument("--memory-gib", type=float, default=0.0, help="merge_memory_gib")
    p.add_argument("--phases", nargs="+", default=["stream", "stage"])
    p.add_argument("--shard-size", default="", help="the base's and the output's shard size")
    p.add_argument("--phase", help=argparse.SUPPRESS)  # one phase, in this process
    a = p.parse_args(argv)
    root = Path(a.out)
    base, adapter = root / "base", root / "adapter"
    if a.phase:
        row = measure(a.phase, base, adapter, root / a.phase, a.memory_gib, a.shard_size)
        print("MERGE " + json.dumps(row, default=str), flush=True)
        return [row]
    if not (base / "config.json").is_file():
        build_base(base, a.size, a.shard_size or "5GB")
    if not (adapter / "adapter_config.json").is_file():
        build_adapter(base, adapter)
    rows = []
    for phase in a.phases:
        args = ["--size", a.size, "--out", a.out, "--memory-gib", str(a.memory_gib)]
        args += ["--shard-size", a.shard_size] if a.shard_size else []
        proc = subprocess.run(
            [sys.executable, __file__, *args, "--phase", phase], capture_output=True, text=True
        )
        if proc.returncode:  # its own error, not only "returned non-zero exit status 1"
            sys.exit(f"phase {phase} failed:\n{proc.stderr[-4000:]}")
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("MERGE ")][-1]
        rows.append(json.loads(line.removeprefix("MERGE ")))
        print(line, flush=True)
        # The next phase writes a model as large as the base: on the GPU machine's 64 GB disk
        # the base, the stream's output and the stage's did not fit together.
        shutil.rmtree(root / phase, ignore_errors=True)
    (root / "merge_bench.json").write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
    from qlora_kfp import fast_exit

    fast_exit.at_exit_leave()  # results written: no module teardown
