"""The embedded default: a tiny random Llama, a BPE tokenizer and a checkable dataset.

Nothing here reaches a hub. The model is built from a ``LlamaConfig`` with random weights, the
tokenizer is trained on the spot with ``tokenizers``, and both are saved exactly like any
checkpoint (``config.json``, ``model.safetensors``, ``tokenizer.json``), so the pipeline loads
them through the same ``from_pretrained`` code it uses for hub ids and ``s3://`` URIs.

The dataset is an antonym task ("What is the opposite of hot?" -> "cold") in several phrasings.
Every eval word also appears in training under another phrasing, so a model that learns the
mapping answers held-out prompts exactly: evaluation can show real learning.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from qlora_kfp.data.templates import CHATML

PAIRS = [
    ("hot", "cold"),
    ("big", "small"),
    ("fast", "slow"),
    ("up", "down"),
    ("open", "closed"),
    ("light", "dark"),
    ("early", "late"),
    ("full", "empty"),
    ("happy", "sad"),
    ("hard", "soft"),
    ("high", "low"),
    ("long", "short"),
    ("loud", "quiet"),
    ("new", "old"),
    ("rich", "poor"),
    ("strong", "weak"),
    ("thick", "thin"),
    ("wet", "dry"),
    ("wide", "narrow"),
    ("young", "aged"),
    ("clean", "dirty"),
    ("near", "far"),
    ("push", "pull"),
    ("win", "lose"),
    ("buy", "sell"),
    ("day", "night"),
    ("left", "right"),
    ("first", "last"),
    ("inside", "outside"),
    ("true", "false"),
]
PHRASINGS = [
    "What is the opposite of {w}?",
    "Give the antonym of {w}.",
    "Opposite of: {w}",
    "Name a word meaning the reverse of {w}.",
]
SPECIAL = ["<|begin_of_text|>", "<|im_end|>", "<|pad|>", "<|im_start|>"]


def demo_rows(seed: int = 0) -> list[dict]:
    """Every (word, phrasing) pair both ways, as Alpaca-style ``instruction``/``output`` rows."""
    rows = []
    for a, b in PAIRS:
        for w, ans in ((a, b), (b, a)):
            rows += [{"instruction": p.format(w=w), "output": ans} for p in PHRASINGS]
    random.Random(seed).shuffle(rows)
    return rows


def write_dataset(path: str | Path, seed: int = 0) -> Path:
    """Write the demo dataset as JSONL."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in demo_rows(seed)))
    return path


def build_tokenizer(texts: list[str], vocab_size: int = 1000):
    """Train a byte-level BPE tokenizer (Llama-3 style) and wrap it for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
    )
    fast.chat_template = CHATML
    return fast


def build_model(
    vocab_size: int, hidden_size: int = 128, layers: int = 2, seed: int = 0, **overrides
):
    """A random Llama with real Llama modules (q/k/v/o, gate/up/down projections).

    ``overrides`` replace ``LlamaConfig`` fields (heads, MLP width, initializer range, ...).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=False,
        # Wider than the usual 0.02: with a frozen random head of 0.02 the logits
        # cannot exceed ~2.5 and no adapter could make the model confident.
        initializer_range=0.1,
    )
    # Given to the constructor, not set afterwards: LlamaConfig derives head_dim from them.
    cfg = LlamaConfig(**{**fields, **overrides})
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def make_demo_assets(root: str | Path, seed: int = 0) -> dict[str, str]:
    """Create ``root/tiny-llama`` (bfloat16 checkpoint + tokenizer) and
    ``root/data/antonyms.jsonl``: named by what they are, as the registered model derived from
    them is (``tiny-llama-antonyms``).

    Returns:
        ``{"base_model": ..., "data_source": ...}``, ready to pass to the pipeline.
    """
    root = Path(root)
    model_dir, data = root / "tiny-llama", root / "data" / "antonyms.jsonl"
    if not (model_dir / "config.json").is_file():  # torch only then: a reused demo starts at once
        import torch
        from transformers.utils import logging as hf_logging

        from qlora_kfp.storage.manifest import atomic_folder

        rows = demo_rows(seed)
        texts = [f"{r['instruction']} {r['output']}" for r in rows]
        texts += ["user assistant system Instruction Response"]
        tok = build_tokenizer(texts)
        model = build_model(len(tok), seed=seed).to(torch.bfloat16)
        # One shard of a tiny model: its progress bar would be make run's first console line.
        shown = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            # Written whole or not at all, and never over files already there (someone's model).
            with atomic_folder(model_dir, "demo-model") as tmp:
                model.save_pretrained(tmp, safe_serialization=True)
                tok.save_pretrained(tmp)
        finally:
            if shown:
                hf_logging.enable_progress_bar()
    if not data.is_file():
        write_dataset(data, seed)
    return {"base_model": str(model_dir), "data_source": str(data)}
