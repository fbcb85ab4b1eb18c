"""Typed configuration, one dataclass per stage.

A field name means the same thing everywhere: CLI flag (``--lora_r``), KFP component
parameter, pipeline parameter and MLflow param. ``tests/core/test_configs.py`` checks that every
component parameter is a field of its stage's config with the same default.
Checks live in ``__post_init__`` and say what to do, so bad values fail before any long work.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from qlora_kfp.errors import ConfigError

DTYPES = ("auto", "bfloat16", "float16", "float32")
PACKING_MODES = ("off", "padding_free", "bins")
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "varlen")
AUTO_ON_OFF = ("auto", "on", "off")
TRAIN_RUNNERS = ("pod", "trainjob", "pytorchjob")
# The runners that train on num_nodes pods the task creates (through S3).
JOB_RUNNERS = ("trainjob", "pytorchjob")
# A ClusterTrainingRuntime's name: an object name (k8s.io/apimachinery validation
# IsDNS1123Subdomain), at most 253 characters.
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
QUANT_STORAGES = ("uint8", "bfloat16", "float16", "float32")
PARALLELISMS = ("auto", "ddp", "fsdp")


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


def _check(ok: bool, name: str, value: Any, what: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r} is invalid: {what}")


@functools.cache
def optimizer_names() -> tuple[str, ...]:
    """The optimizer names transformers' Trainer takes (empty where it is not installed, as
    when compiling pipelines: the check then runs in the task)."""
    try:
        from transformers.training_args import OptimizerNames
    except ImportError:
        return ()
    return tuple(o.value for o in OptimizerNames)


# Optimizers of transformers' Trainer that import a package of their own when the trainer is
# created (transformers/trainer_optimizer.py): (name or name prefix, module, pip package).
OPTIMIZER_PACKAGES = (
    ("galore_", "galore_torch", "galore-torch"),
    ("apollo_", "apollo_torch", "apollo-torch"),
    ("lomo", "lomo_optim", "lomo-optim"),
    ("adalomo", "lomo_optim", "lomo-optim"),
    ("grokadamw", "grokadamw", "grokadamw"),
    ("adamw_torch_4bit", "torchao", "torchao"),
    ("adamw_torch_8bit", "torchao", "torchao"),
    ("schedule_free_", "schedulefree", "schedulefree"),
    ("stable_adamw", "optimi", "torch-optimi"),
    ("adamw_torch_xla", "torch_xla", "torch-xla"),
    ("adamw_torch_npu_fused", "torch_npu", "torch-npu"),
    ("adamw_anyprecision", "torchdistx", "torchdistx"),
)


def optimizer_package(name: str) -> str:
    """The pip package optimizer ``name`` needs and this environment lacks ("" when none)."""
    import importlib.util

    for prefix, module, package in OPTIMIZER_PACKAGES:
        if name == prefix or prefix.endswith("_") and name.startswith(prefix):
            return "" if importlib.util.find_spec(module) else package
    return ""


def _one_of(name: str, value: Any, choices: tuple[str, ...]) -> None:
    _check(value in choices, name, value, f"choose one of {', '.join(choices)}")


@dataclass
class PrepareConfig:
    """Dataset preparation: read, render with a chat template, tokenize, mask, split."""

    data_source: str = _help("Dataset: local file or folder, s3://bucket/key, or a hub dataset id.")
    base_model: str = _help("Base model (hub id, local path or s3:// URI); its tokenizer is used.")
    data_format: str = _help(
        "auto, jsonl, json, csv or parquet (auto: from the extension).", default="auto"
    )
    chat_template: str = _help(
        "auto (the tokenizer's own template, else chatml), tokenizer, chatml or alpaca.",
        default="auto",
    )
    max_seq_length: int = _help("Longest row in tokens after rendering.", default=512)
    overlong: str = _help(
        "What to do with rows over max_seq_length: drop or truncate.", default="drop"
    )
    train_on_prompt: bool = _help(
        "Also train on prompt tokens (default: completions only).", default=False
    )
    dedupe: bool = _help("Drop exact duplicate rows (after rendering).", default=True)
    eval_fraction: float = _help("Share of rows held out for evaluation.", default=0.1)
    min_eval_rows: int = _help("Fail when the eval split would be smaller than this.", default=1)
    max_rows: int = _help("Read at most this many rows (0: all).", default=0)
    seed: int = _help("Random seed for the split, LoRA init and data order.", default=42)
    trust_remote_code: bool = _help(
        "Allow custom code from the model repo (off: safer).", default=False
    )

    def __post_init__(self) -> None:
        _check(bool(self.data_source), "data_source", self.data_source, "give a path or URI")
        _check(bool(self.base_model), "base_model", self.base_model, "give a path or URI")
        _one_of("data_format", self.data_format, ("auto", "jsonl", "json", "csv", "parquet"))
        _one_of("chat_template", self.chat_template, ("auto", "tokenizer", "chatml", "alpaca"))
        _one_of("overlong", self.overlong, ("drop", "truncate"))
        _check(
            16 <= self.max_seq_length <= 131072,
            "max_seq_length",
            self.max_seq_length,
            "use a value between 16 and 131072",
        )
        _check(
            0.0 < self.eval_fraction < 0.9,
            "eval_fraction",
            self.eval_fraction,
            "use a fraction between 0 and 0.9, e.g. 0.1",
        )
        _check(self.min_eval_rows >= 1, "min_eval_rows", self.min_eval_rows, "use 1 or more")
        _check(
            self.max_rows >= 0, "max_rows", self.max_rows, "use 0 (all rows) or a positive count"
        )


@dataclass
class QuantizeConfig:
    """4-bit quantization of the base model with bitsandbytes."""

    base_model: str = _help("Base model (hub id, local path or s3:// URI) in 16 or 32 bit.")
    quant_type: str = _help("4-bit data type: nf4 (QLoRA's NormalFloat) or fp4.", default="nf4")
    double_quant: bool = _help(
        "Quantize the quantization constants too (saves ~0.4 bit/param).", default=True
    )
    compute_dtype: str = _help(
        "Dtype of 4-bit matmuls: auto (bfloat16 on GPU, float32 on CPU), bfloat16, float16, "
        "float32.",
        default="auto",
    )
    quant_storage: str = _help(
        "Dtype the packed 4-bit weights are stored in (the same bytes, two weights a byte, "
        "only their tensor dtype differs): uint8, or bfloat16, float16 or float32, which "
        "FSDP can shard (parallelism=fsdp needs one; on a GPU the one training computes in, "
        "bfloat16 by default).",
        default="uint8",
    )
    eval_rows: int = _help(
        "Eval rows used for the 16-bit vs 4-bit perplexity (0: all).", default=64
    )
    trust_remote_code: bool = _help(
        "Allow custom code from the model repo (off: safer).", default=False
    )

    def __post_init__(self) -> None:
        _check(bool(self.base_model), "base_model", self.base_model, "give a path or URI")
        _one_of("quant_type", self.quant_type, ("nf4", "fp4"))
        _one_of("compute_dtype", self.compute_dtype, DTYPES)
        _one_of("quant_storage", self.quant_storage, QUANT_STORAGES)
        _check(self.eval_rows >= 0, "eval_rows", self.eval_rows, "use 0 (all) or more")


@dataclass
class TrainConfig:
    """QLoRA training of a LoRA adapter on the 4-bit model."""

    lora_r: int = _help("LoRA rank.", default=16)
    lora_alpha: int = _help("LoRA scaling numerator (scale = alpha / r).", default=32)
    lora_dropout: float = _help("Dropout on the LoRA path.", default=0.05)
    target_modules: str = _help(
        "Comma-separated module names to adapt, or all-linear (every Linear but the head).",
        default="all-linear",
    )
    use_dora: bool = _help("Weight-decomposed LoRA (DoRA).", default=False)
    use_rslora: bool = _help("Rank-stabilized LoRA scaling (alpha / sqrt(r)).", default=False)
    learning_rate: float = _help("Peak learning rate.", default=2e-4)
    lr_scheduler: str = _help(
        "Learning-rate schedule after the warmup: cosine, linear or constant (constant warms "
        "up too when warmup_ratio > 0, unlike transformers' own constant).",
        default="cosine",
    )
    warmup_ratio: float = _help("Share of steps spent warming up the learning rate.", default=0.03)
    num_epochs: float = _help(
        "Passes over the training split (ignored when max_steps > 0).", default=1.0
    )
    max_steps: int = _help("Stop after this many optimizer steps (0: use num_epochs).", default=0)
    batch_size: int = _help("Micro-batch size per device.", default=4)
    gradient_accumulation_steps: int = _help("Micro-batches per optimizer step.", default=1)
    gradient_checkpointing: bool = _help(
        "Recompute activations in backward to save memory.", default=True
    )
    gradient_checkpointing_layers: str = _help(
        "With gradient_checkpointing: how many decoder layers, counted from the first, "
        "recompute their activations in backward (-1: all). The others keep theirs: no "
        "recompute (faster) for more memory. auto: the fewest that fit the GPU (the smaller "
        "of its free memory and gpu_memory_gib, by the preflight estimate with a margin); "
        "if the first steps still run out of memory, training restarts from scratch with "
        "more layers checkpointed.",
        default="auto",
    )
    gradient_checkpointing_offload: str = _help(
        "Keep the inputs of checkpointed layers in pinned host memory instead of on the GPU "
        "(copied out and back on side streams, overlapped with compute): on, off or auto "
        "(on when some layer is checkpointed and the host has room). Frees tokens x hidden "
        "x 2 bytes per checkpointed layer.",
        default="auto",
    )
    gpu_memory_gib: float = _help(
        "Memory of one GPU in GiB: preflight fails before any GPU is claimed when training "
        "cannot fit it, and names the setting that would; the train stage's auto settings "
        "fit the smaller of this and the GPU's free memory.",
        default=80.0,
    )
    num_processes: int = _help(
        "Training processes in the train task's pod (with train_runner=trainjob: in each "
        "node's pod), one per GPU (DDP: each GPU holds the "
        "4-bit base and trains on its own micro-batches of batch_size; the LoRA gradients are "
        "averaged, so one optimizer step sees batch_size x gradient_accumulation_steps x "
        "num_processes rows). 0: one per visible GPU (the pipeline's GPUs per task, "
        "QLORA_KFP_GPUS at compile time; 1 on the CPU). On the CPU a count above 1 runs that "
        "many processes with the gloo backend (for tests).",
        default=0,
    )
    parallelism: str = _help(
        "How several processes (num_processes above 1) train: ddp (each GPU holds the whole "
        "4-bit model; fastest), fsdp (the 4-bit weights, LoRA weights and optimizer state "
        "are sharded over the GPUs and each layer is gathered while it runs: for a model "
        "that does not fit one GPU; needs a model quantized with quant_storage=bfloat16) or "
        "auto (ddp when the preflight estimate of one GPU's memory under DDP fits "
        "gpu_memory_gib, else fsdp). Ignored with one process.",
        default="auto",
    )
    optimizer: str = _help(
        "Optimizer (a transformers name). auto: adamw_torch_fused on a GPU, adamw_torch on the "
        "CPU. Choose paged_adamw_32bit when the optimizer state must page to host memory "
        "under memory spikes.",
        default="auto",
    )
    weight_decay: float = _help("AdamW weight decay.", default=0.0)
    max_grad_norm: float = _help("Gradient clipping norm (QLoRA paper: 0.3).", default=0.3)
    eval_steps: int = _help("Evaluate every this many steps (0: only at the end).", default=0)
    logging_steps: int = _help("Log training metrics every this many steps.", default=5)
    length_grouping: bool = _help(
        "Batch rows of similar length together (less padding, same data per epoch).",
        default=True,
    )
    packing: str = _help(
        "How rows become batches: padding_free (a micro-batch's rows end to end in one row, "
        "each document attending only to itself: no compute on padding, same loss as off), "
        "bins (rows packed into bins of pack_length tokens; batch_size counts bins; fewer, "
        "fuller steps) or off (pad each micro-batch to its longest row).",
        default="padding_free",
    )
    pack_length: int = _help(
        "Tokens per bin when packing=bins (0: the longest training row).", default=0
    )
    fp32_upcast: bool = _help(
        "Cast the 16-bit weights (embeddings, norms, head) to float32 before training, as "
        "peft's prepare_model_for_kbit_training does: slower and more memory; turn on only "
        "to reproduce peft's numerics. Off: they stay in compute_dtype (LoRA weights are "
        "float32 either way).",
        default=False,
    )
    fused_kernels: str = _help(
        "Liger fused kernels (RMSNorm, SwiGLU, RoPE, linear+cross-entropy without the "
        "vocab-sized logits): auto (on a GPU when liger-kernel is installed), on or off.",
        default="auto",
    )
    fused_lora: bool = _help(
        "Compute each LoRA update as one addmm (scaling and add inside the matmul) instead of "
        "peft's clone, scale and add: the same sum with one rounding, fewer passes over "
        "activations. Turn off only to compare with peft's own forward.",
        default=True,
    )
    fp8_base: str = _help(
        "Multiply the frozen 4-bit base weights in FP8 (e4m3, a scale per row; the LoRA "
        "path, its gradients and the optimizer stay as they are): auto (on a GPU that "
        "multiplies FP8: Ada, Hopper and later), on or off. 7-17% faster steps on an H100 at "
        "the same peak memory; the numerics move slightly (adapter gradients' cosine 0.99 to "
        "the bf16 path, 20-step loss windows within 2% over 200 steps on the GPU: "
        "BENCHMARKS.md). Set off to reproduce bf16 runs exactly.",
        default="auto",
    )
    attn_implementation: str = _help(
        "Attention kernel: varlen (flash attention per document of a packed row; CUDA), sdpa, "
        "eager, or auto (varlen on a GPU when packing is on, else sdpa). Set sdpa or eager "
        "only to compare numerics.",
        default="auto",
    )
    checkpoint_steps: int = _help(
        "Save a resumable checkpoint every this many steps (0: never). A restarted task "
        "resumes from the newest complete one (local, or the S3 mirror).",
        default=50,
    )
    train_runner: str = _help(
        "Where training runs: pod (the train task's own pod trains: one node), trainjob (the "
        "train task creates a Kubeflow Trainer v2 TrainJob of num_nodes pods, each like its "
        "own pod, relays its logs and status, and fetches the adapter; needs the Trainer "
        "installed, the role of manifests/components/trainjob and QLORA_KFP_ARTIFACT_URI), or "
        "pytorchjob (the same as a Training Operator v1 PyTorchJob, for a cluster that has "
        "the older operator and not the Trainer).",
        default="pod",
    )
    num_nodes: int = _help(
        "Pods (nodes) training together with train_runner=trainjob or pytorchjob, each with the train "
        "task's GPUs and num_processes processes: one optimizer step sees batch_size x "
        "gradient_accumulation_steps x num_processes x num_nodes rows. 1 with "
        "train_runner=pod.",
        default=1,
    )
    training_runtime: str = _help(
        "ClusterTrainingRuntime the TrainJob runs on (train_runner=trainjob): the Trainer's "
        "torch-distributed, or one of yours built on it.",
        default="torch-distributed",
    )
    compute_dtype: str = QuantizeConfig.__dataclass_fields__["compute_dtype"].default
    seed: int = PrepareConfig.__dataclass_fields__["seed"].default

    def __post_init__(self) -> None:
        _check(1 <= self.lora_r <= 1024, "lora_r", self.lora_r, "use a rank from 1 to 1024")
        _check(self.lora_alpha > 0, "lora_alpha", self.lora_alpha, "use a positive number")
        _check(
            0.0 <= self.lora_dropout < 1.0,
            "lora_dropout",
            self.lora_dropout,
            "use a value in [0, 1)",
        )
        _check(
            bool(self.target_modules.strip()),
            "target_modules",
            self.target_modules,
            "name modules (e.g. q_proj,v_proj) or use all-linear",
        )
        _check(
            0 < self.learning_rate < 1,
            "learning_rate",
            self.learning_rate,
            "use a small positive value such as 2e-4",
        )
        _one_of("lr_scheduler", self.lr_scheduler, ("cosine", "linear", "constant"))
        _check(0 <= self.warmup_ratio < 1, "warmup_ratio", self.warmup_ratio, "use [0, 1)")
        _check(
            self.num_epochs > 0 or self.max_steps > 0,
            "num_epochs",
            self.num_epochs,
            "set num_epochs > 0 or max_steps > 0",
        )
        _check(self.max_steps >= 0, "max_steps", self.max_steps, "use 0 or more")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "use 1 or more")
        _check(
            self.gradient_accumulation_steps >= 1,
            "gradient_accumulation_steps",
            self.gradient_accumulation_steps,
            "use 1 or more",
        )
        # Old params files and sweep grids give a count as a number, and KFP hands a sweep's
        # grid entry over as JSON, where 8 arrives as 8.0.
        layers = self.gradient_checkpointing_layers
        if isinstance(layers, float) and layers.is_integer():
            layers = int(layers)
        self.gradient_checkpointing_layers = str(layers).strip()
        layers = self.gradient_checkpointing_layers
        _check(
            layers == "auto" or layers.lstrip("-").isdigit() and int(layers) >= -1,
            "gradient_checkpointing_layers",
            layers,
            "use auto, -1 (every layer) or a count of layers from 0",
        )
        _one_of("gradient_checkpointing_offload", self.gradient_checkpointing_offload, AUTO_ON_OFF)
        _check(self.gpu_memory_gib > 0, "gpu_memory_gib", self.gpu_memory_gib, "use > 0")
        _check(
            0 <= self.num_processes <= 64,
            "num_processes",
            self.num_processes,
            "use 0 (one per visible GPU) or a count of processes up to 64 (GPUs of one pod)",
        )
        _one_of("parallelism", self.parallelism, PARALLELISMS)
        _check(0 < self.max_grad_norm < math.inf, "max_grad_norm", self.max_grad_norm, "use > 0")
        _check(
            0 <= self.weight_decay <= 1,
            "weight_decay",
            self.weight_decay,
            "use a value from 0 to 1, e.g. 0.01 (larger values drive the weights to NaN)",
        )
        _check(
            self.num_epochs < math.inf,
            "num_epochs",
            self.num_epochs,
            "use a finite number of passes, or max_steps",
        )
        _check(self.eval_steps >= 0, "eval_steps", self.eval_steps, "use 0 or more")
        _check(self.logging_steps >= 1, "logging_steps", self.logging_steps, "use 1 or more")
        _one_of("compute_dtype", self.compute_dtype, DTYPES)
        _one_of("fused_kernels", self.fused_kernels, AUTO_ON_OFF)
        _one_of("fp8_base", self.fp8_base, AUTO_ON_OFF)
        _one_of("packing", self.packing, PACKING_MODES)
        _check(self.pack_length >= 0, "pack_length", self.pack_length, "use 0 (auto) or more")
        _one_of("attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)
        _check(
            self.attn_implementation != "varlen" or self.packing != "off",
            "attn_implementation",
            self.attn_implementation,
            "varlen needs packed rows: set packing to padding_free or bins, or use sdpa",
        )
        _check(self.checkpoint_steps >= 0, "checkpoint_steps", self.checkpoint_steps, "use >= 0")
        _one_of("train_runner", self.train_runner, TRAIN_RUNNERS)
        _check(
            1 <= self.num_nodes <= 64,
            "num_nodes",
            self.num_nodes,
            "use a count of nodes from 1 to 64",
        )
        _check(
            self.num_nodes == 1 or self.train_runner in JOB_RUNNERS,
            "num_nodes",
            self.num_nodes,
            "several nodes train only as a TrainJob or PyTorchJob: set train_runner=trainjob "
            "(or pytorchjob), or num_nodes=1",
        )
        _check(
            len(self.training_runtime) <= 253
            and bool(_DNS_SUBDOMAIN.fullmatch(self.training_runtime)),
            "training_runtime",
            self.training_runtime,
            "name a ClusterTrainingRuntime (lower-case letters, digits, '-' and '.'), e.g. "
            "torch-distributed",
        )
        # Imports transformers (seconds): only for a name that is not the default.
        names = optimizer_names() if self.optimizer != "auto" else ()
        if names and self.optimizer not in names:
            close = difflib.get_close_matches(self.optimizer, names, n=1, cutoff=0.5)
            _check(
                False,
                "optimizer",
                self.optimizer,
                (f"did you mean {close[0]}? " if close else "")
                + "use auto or a name of transformers' OptimizerNames, e.g. adamw_torch, "
                "adamw_torch_fused, paged_adamw_32bit, adamw_8bit",
            )
        # Checked where the trainer would run (the package's absence there fails at trainer
        # creation, with transformers' ImportError): not when compiling pipelines (no names).
        package = optimizer_package(self.optimizer) if names else ""
        _check(
            not package,
            "optimizer",
            self.optimizer,
            f"optimizer {self.optimizer} needs the package {package}, which is not installed: "
            f"pip install {package}, or choose auto, adamw_torch, paged_adamw_32bit or adamw_8bit",
        )

    def check_runner(self, artifact_uri: str) -> None:
        """Refuse ``train_runner=trainjob`` (or pytorchjob) without an S3 artifact store: the job's
        nodes read their inputs and write the adapter there. Checked where the store is
        known (the preflight and the train task), not here: a client compiling or starting
        a run has no ``QLORA_KFP_ARTIFACT_URI``.

        Raises:
            ConfigError: naming the variable to set.
        """
        _check(
            self.train_runner not in JOB_RUNNERS or artifact_uri.startswith("s3://"),
            "train_runner",
            self.train_runner,
            f"a {self.train_runner}'s nodes read the inputs and write the adapter through S3: set "
            "QLORA_KFP_ARTIFACT_URI (e.g. s3://bucket/qlora) for the tasks, or use "
            "train_runner=pod",
        )

    @property
    def world_size(self) -> int:
        """Training processes in all: ``num_processes`` (0 counts as 1) on each node."""
        return max(self.num_processes, 1) * self.num_nodes

    @property
    def checkpointed_layers(self) -> int | None:
        """``gradient_checkpointing_layers`` as a count (-1: all), None for auto."""
        layers = self.gradient_checkpointing_layers
        return None if layers == "auto" else int(layers)

    @property
    def target_module_list(self) -> str | list[str]:
        """The value peft expects: ``"all-linear"`` or a list of module names."""
        if self.target_modules.strip() == "all-linear":
            return "all-linear"
        return [m.strip() for m in self.target_modules.split(",") if m.strip()]


@dataclass
class EvaluateConfig:
    """Base vs tuned on the eval split: loss, perplexity and scored generations."""

    num_generations: int = _help("Eval prompts to generate answers for.", default=16)
    max_new_tokens: int = _help("Longest generated answer in tokens.", default=64)
    eval_rows: int = QuantizeConfig.__dataclass_fields__["eval_rows"].default
    compute_dtype: str = QuantizeConfig.__dataclass_fields__["compute_dtype"].default

    def __post_init__(self) -> None:
        _check(self.num_generations >= 0, "num_generations", self.num_generations, "use >= 0")
        _check(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "use >= 1")
        _check(self.eval_rows >= 0, "eval_rows", self.eval_rows, "use 0 (all) or more")
        _one_of("compute_dtype", self.compute_dtype, DTYPES)


@dataclass
class MergeConfig:
    """Merge the adapter into the 16-bit base model and verify the logits."""

    base_model: str = _help("Base model in 16 or 32 bit (not the 4-bit copy).")
    merge_dtype: str = _help(
        "Dtype of the saved merged model: bfloat16, float16 or float32.", default="bfloat16"
    )
    merge_tolerance: float = _help(
        "Largest allowed |written - (base+adapter)| logit difference, computed in float32 "
        "(base+adapter merged by peft and cast to merge_dtype, as the written weights are).",
        default=1e-3,
    )
    merge_memory_gib: float = _help(
        "Memory in GiB the logit check may fill with each model it compares, on each device "
        "(each GPU, and the CPU); the layers beyond it are offloaded to disk beside the "
        "output. 0: what is free on each GPU and 80% of what the host (or the pod's memory "
        "limit) can still give. The merge itself holds one weights shard.",
        default=0.0,
    )
    trust_remote_code: bool = PrepareConfig.__dataclass_fields__["trust_remote_code"].default

    def __post_init__(self) -> None:
        _check(bool(self.base_model), "base_model", self.base_model, "give a path or URI")
        _one_of("merge_dtype", self.merge_dtype, ("bfloat16", "float16", "float32"))
        # inf (or NaN) would pass every logit difference: the check would be off, silently.
        _check(
            math.isfinite(self.merge_tolerance) and self.merge_tolerance > 0,
            "merge_tolerance",
            self.merge_tolerance,
            "use a finite value > 0, e.g. 1e-3",
        )
        _check(
            math.isfinite(self.merge_memory_gib) and self.merge_memory_gib >= 0,
            "merge_memory_gib",
            self.merge_memory_gib,
            "use 0 (what is free) or a finite number of GiB > 0, e.g. 40",
        )


# A registered model's name: what a user may give, and what a derived one is made of. At most
# 63 characters, as a Kubernetes (DNS label) name, so that a serving resource can bear it too.
REGISTERED_NAME_LENGTH = 63
_REGISTERED_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?")
DATA_SUFFIXES = (".gz", ".jsonl", ".json", ".csv", ".parquet")


def source_stem(source: str, suffixes: tuple[str, ...] = ()) -> str:
    """A model's or dataset's short name: the last non-empty part of its path, URI or hub id
    (``meta-llama/Llama-3.1-8B`` -> ``Llama-3.1-8B``, ``s3://b/sets/support-v2/`` ->
    ``support-v2``), without any of ``suffixes`` at its end (``chats.jsonl.gz`` -> ``chats``)."""
    stem = source.strip().rstrip("/").rsplit("/", 1)[-1]
    while stem.lower().endswith(suffixes):
        stem = stem.rsplit(".", 1)[0]
    return stem


def _name_part(text: str, fallback: str) -> str:
    """``text`` in lower-case letters, digits and single '-' (accents dropped: é -> e)."""
    import unicodedata

    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-") or fallback


def derived_model_name(base_model: str, data_source: str) -> str:
    """``<base model>-<dataset>``: each source's short name (:func:`source_stem`; a dataset's
    without data extensions) in lower-case letters, digits and '-', e.g.
    ``llama-3-1-8b-support-v2`` for ``meta-llama/Llama-3.1-8B`` and
    ``s3://bucket/datasets/support-v2/``. A name over :data:`REGISTERED_NAME_LENGTH` keeps the
    start of each part and ends with 6 hex digits of the whole one's digest, so two long names
    that differ only at their ends stay apart."""
    import hashlib

    model = _name_part(source_stem(base_model), "model")
    data = _name_part(source_stem(data_source, DATA_SUFFIXES), "data")
    whole = f"{model}-{data}"
    if len(whole) <= REGISTERED_NAME_LENGTH:
        return whole
    digest = hashlib.sha256(whole.encode()).hexdigest()[:6]
    room = REGISTERED_NAME_LENGTH - len(digest) - 2  # two '-': after model and after data
    half = room // 2
    if len(model) <= half:
        data = data[: room - len(model)]
    elif len(data) <= half:
        model = model[: room - len(data)]
    else:
        model, data = model[:half], data[: room - half]
    return f"{model.rstrip('-')}-{data.rstrip('-')}-{digest}"


@dataclass
class RegisterConfig:
    """Register the merged model in the MLflow Model Registry (challenger / champion)."""

    base_model: str = _help("Base model the adapter was trained on (a tag of the version).")
    data_source: str = _help(
        "Dataset the adapter was trained on (with base_model it names the registered model "
        "when registered_model_name is empty)."
    )
    registered_model_name: str = _help(
        "MLflow registered model the version is added to. Empty: <base model>-<dataset>, each "
        "the last part of its path, URI or hub id (a dataset's without data extensions) in "
        "lower-case letters, digits and '-', at most 63 characters, e.g. "
        "llama-3-1-8b-support-v2 for meta-llama/Llama-3.1-8B trained on "
        "s3://bucket/datasets/support-v2/. A name given: 1 to 63 letters, digits, '.', '_' or "
        "'-', beginning and ending with a letter or digit.",
        default="",
    )

    def __post_init__(self) -> None:
        name = self.registered_model_name
        if not name:
            _check(bool(self.base_model), "base_model", self.base_model, "give a path or URI")
            _check(bool(self.data_source), "data_source", self.data_source, "give a path or URI")
            # Resolved here, so the stage, its MLflow params and the retraining gate see the
            # one name the version goes to.
            self.registered_model_name = derived_model_name(self.base_model, self.data_source)
            return
        _check(
            bool(_REGISTERED_NAME.fullmatch(name)),
            "registered_model_name",
            name,
            "use 1 to 63 letters, digits, '.', '_' or '-', beginning and ending with a letter "
            "or digit (no '/', ':', '@' or spaces), e.g. support-bot-v2; or leave it empty "
            "for <base model>-<dataset>",
        )


@dataclass
class PipelineConfig:
    """Settings of a whole pipeline run that belong to no single stage."""

    mlflow_experiment: str = _help(
        "MLflow experiment the run's parent and stage runs go to.", default="qlora-finetune"
    )
    run_name: str = _help(
        "Name of the parent MLflow run (empty: <pipeline>-<dataset>-<yyyymmdd-hhmm>, e.g. "
        "qlora-finetune-support-chats-20250301-0400).",
        default="",
    )
    force_retrain: bool = _help(
        "Train even when the registered champion was made from exactly this dataset, base "
        "model, code version and result-changing settings (else such a run skips training "
        "and says so).",
        default=False,
    )
    gpu_accelerator: str = _help(
        "Kubernetes resource name of the GPU the GPU tasks claim (nvidia.com/gpu, "
        "amd.com/gpu, a MIG profile such as nvidia.com/mig-3g.40gb).",
        default="nvidia.com/gpu",
    )
    # No default label: requesting gpu_accelerator already puts the pod on a node that has
    # one, and a label such as nvidia.com/gpu.present (set only by NVIDIA's GPU feature
    # discovery) would leave GPU tasks Pending forever on GKE, EKS or AKS without it.
    gpu_node_selector: dict = _help(
        "Node labels the GPU tasks' pods must match (JSON object), e.g. "
        '{"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}; {} (default): any node '
        "with the GPU resource.",
        default_factory=dict,
    )
    gpu_tolerations: list = _help(
        "Taints of the GPU node pool the GPU tasks tolerate (JSON list of Kubernetes "
        "tolerations: key, operator Exists|Equal, value, effect); [] for none.",
        default_factory=lambda: [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ],
    )

    def __post_init__(self) -> None:
        _check(bool(self.mlflow_experiment), "mlflow_experiment", "", "name an experiment")
        _check(
            bool(_QUALIFIED.fullmatch(self.gpu_accelerator)),
            "gpu_accelerator",
            self.gpu_accelerator,
            "use a resource name such as nvidia.com/gpu",
        )
        _check_node_selector(self.gpu_node_selector)
        for i, toleration in enumerate(self.gpu_tolerations):
            _check_toleration(i, toleration)


# Kubernetes label keys/values and resource names (k8s.io/apimachinery/pkg/util/validation:
# IsQualifiedName, IsValidLabelValue): an optional DNS prefix, then a name of <= 63 chars.
_NAME = r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)"
_QUALIFIED = re.compile(rf"([a-z0-9]([-a-z0-9.]{{0,251}}[a-z0-9])?/)?{_NAME}")
_LABEL_VALUE = re.compile(rf"{_NAME}?")
# Toleration rules of kubernetes pkg/apis/core/validation/validation.go ValidateTolerations.
_TOLERATION_KEYS = {"key", "operator", "value", "effect", "tolerationSeconds"}
_EFFECTS = ("", "NoSchedule", "PreferNoSchedule", "NoExecute")


def _check_node_selector(selector: Any) -> None:
    name = "gpu_node_selector"
    _check(
        isinstance(selector, dict),
        name,
        selector,
        'use a JSON object of labels, e.g. {"pool": "gpu"}',
    )
    for key, value in selector.items():
        _check(bool(_QUALIFIED.fullmatch(str(key))), name, key, "label keys are prefix/name")
        _check(
            isinstance(value, str) and bool(_LABEL_VALUE.fullmatch(value)),
            name,
            {key: value},
            "label values are strings of at most 63 letters, digits, '-', '_' or '.'",
        )


def _check_toleration(i: int, tol: Any) -> None:
    name = f"gpu_tolerations[{i}]"
    _check(isinstance(tol, dict), name, tol, "each toleration is a JSON object")
    unknown = sorted(set(tol) - _TOLERATION_KEYS)
    _check(not unknown, name, tol, f"unknown key {unknown[:1]}; use {sorted(_TOLERATION_KEYS)}")
    op = tol.get("operator", "Equal")
    _check(op in ("Exists", "Equal"), name, tol, "operator is Exists or Equal")
    _check(op != "Exists" or not tol.get("value"), name, tol, "operator Exists takes no value")
    _check(bool(tol.get("key")) or op == "Exists", name, tol, "an empty key needs operator Exists")
    _check(tol.get("effect", "") in _EFFECTS, name, tol, f"effect is one of {_EFFECTS[1:]}")
    _check(
        "tolerationSeconds" not in tol or tol.get("effect") == "NoExecute",
        name,
        tol,
        "tolerationSeconds goes with effect NoExecute only",
    )


STAGE_CONFIGS: dict[str, type] = {
    "prepare": PrepareConfig,
    "quantize": QuantizeConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
    "merge": MergeConfig,
    "register": RegisterConfig,
}
ALL_CONFIGS: tuple[type, ...] = (*STAGE_CONFIGS.values(), PipelineConfig)

# Settings that change how fast training runs or what it logs, not the model it makes. A
# checkpoint made under other values may still be resumed (training/resume.py), and a
# champion made under other values is still what these settings would make (the retraining
# gate, tasks/bookkeeping_tasks.decide_training). Every other field, including any added
# later, changes the result.
RESULT_INDEPENDENT = frozenset(
    {
        "logging_steps",
        "eval_steps",
        "checkpoint_steps",
        "gradient_checkpointing",
        "gradient_checkpointing_layers",
        "gradient_checkpointing_offload",
        "gpu_memory_gib",
        # How much of the model the merge's logit check holds in memory, not what it checks.
        "merge_memory_gib",
        "fused_kernels",
        "fused_lora",
        "attn_implementation",
        # Where the processes run, not how many: a TrainJob of one node trains as the pod.
        "train_runner",
        "training_runtime",
        # The same 4-bit bytes under another tensor dtype: the same model.
        "quant_storage",
    }
)
# The stages whose settings make a registered model and its evaluation.
RESULT_STAGES = ("prepare", "quantize", "train", "evaluate", "merge")
# Named by where they are; what they hold is digested by content (storage/fingerprint.py).
SOURCE_FIELDS = frozenset({"data_source", "base_model"})


def result_settings(params: dict[str, Any], stages: tuple[str, ...] = RESULT_STAGES) -> dict:
    """The settings of ``stages`` that change what a run makes, defaults filled in, as JSON
    values (so that a tuple and a list compare equal after a round trip through a manifest or
    an MLflow tag)."""
    out: dict[str, Any] = {}
    for name in stages:
        cfg = from_params(STAGE_CONFIGS[name], params)
        for key, value in dataclasses.asdict(cfg).items():
            if key not in RESULT_INDEPENDENT and key not in SOURCE_FIELDS:
                out.setdefault(key, value)
    return json.loads(json.dumps(out))


def setting_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``name old -> new`` for every setting that differs between two :func:`result_settings`."""
    return [
        f"{k} {old.get(k)!r} -> {new.get(k)!r}"
        for k in sorted(old | new)
        if old.get(k) != new.get(k)
    ]


@dataclass(frozen=True)
class Param:
    """One parameter as every layer sees it: CLI flag, component and pipeline input."""

    name: str
    type: type
    default: Any  # dataclasses.MISSING: required
    help: str

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING


def params_of(*classes: type) -> list[Param]:
    """The fields of ``classes`` in order, each name once (a shared field, such as ``seed``,
    has one default and one help text: its owner's)."""
    import typing

    out: dict[str, Param] = {}
    for cls in classes:
        hints, helps = typing.get_type_hints(cls), field_help(cls)
        for f in dataclasses.fields(cls):
            if f.name not in out:
                out[f.name] = Param(f.name, hints[f.name], field_default(f), helps[f.name])
    return list(out.values())


def field_default(f: dataclasses.Field) -> Any:
    """A field's default, also when it is made by a factory (dict and list defaults)."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def check_known(params: dict[str, Any], known: set[str] | list[str], where: str) -> None:
    """Fail on a key that is no parameter, naming the closest valid one (typos in params
    files, sweep grids)."""
    import difflib

    for key in params:
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"{where}: unknown parameter {key!r}{hint}")


def field_help(cls: type) -> dict[str, str]:
    """Help text of every field of a config class (shared fields borrow it from their owner)."""
    out = {}
    for f in dataclasses.fields(cls):
        text = f.metadata.get("help")
        for owner in ALL_CONFIGS:
            if text:
                break
            of = owner.__dataclass_fields__.get(f.name)
            text = of.metadata.get("help") if of else None
        out[f.name] = text or ""
    return out


TYPE_WORDS = {
    str: "text",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    list: "a JSON list",
    dict: "a JSON object",
}
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def convert(value: Any, typ: type) -> Any:
    """``value`` as the declared ``typ``, converting only where the value meant is exact.

    A number written as text is the number (PyYAML reads ``2e-4``, which has no dot, as the
    text ``"2e-4"``; a quoted ``"8"``), and a whole float is an integer (JSON carries 16 as
    16.0: KFP loop items, params files). A fraction for an integer, a non-finite number, a
    null or any other type is refused.

    Raises:
        ValueError: why not, e.g. ``got float 8.5``; the caller names the file and field.
    """
    if typ in (int, float) and isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        text = value.strip()
        value = int(text) if typ is int and text.lstrip("+-").isdigit() else float(text)
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if typ in (int, float) and number and not math.isfinite(value):
        raise ValueError(f"got {value}, not a finite number")
    if typ is float and number:
        return float(value)
    if typ is int and number and float(value).is_integer():
        return int(value)
    if typ in TYPE_WORDS and typ not in (int, float) and isinstance(value, typ):
        return value
    if value is None:
        raise ValueError("got null; give a value, or leave the key out for the default")
    kind = "true/false" if isinstance(value, bool) else type(value).__name__
    shown = f" {value!r}" if number or isinstance(value, str) else ""
    raise ValueError(f"got {kind}{shown}")


def from_params(cls: type, params: dict[str, Any]) -> Any:
    """Build ``cls`` from a dict, ignoring keys that are not its fields (e.g. artifacts).

    Number and true/false fields are :func:`convert`-ed (a sweep grid's ``"2e-4"``, KFP's
    16.0); a value that is not what the field takes is one :class:`ConfigError` naming it.
    """
    import typing

    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if f.name not in params:
            continue
        value, typ = params[f.name], hints[f.name]
        if typ in (int, float, bool):
            try:
                value = convert(value, typ)
            except ValueError as exc:
                raise ConfigError(
                    f"{f.name}={value!r} is invalid: takes {TYPE_WORDS[typ]}, {exc}"
                ) from None
        out[f.name] = value
    return cls(**out)
