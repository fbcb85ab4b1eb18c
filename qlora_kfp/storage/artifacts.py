"""What the stages' artifacts hold on disk, read and written in one place.

Each stage writes one artifact folder (:func:`qlora_kfp.storage.manifest.atomic_folder`) and
the next stages read it; the files one stage leaves for another are defined here, so no stage
imports another:

* a prepared dataset (``dataset``): ``train.parquet`` and ``eval.parquet`` (token rows with
  ``input_ids``, ``labels``, ``prompt``, ``reference``), a tokenizer, ``stats.json``; its
  digest is the two splits' manifest hashes (:func:`dataset_digest`);
* a quantized model (``quantized-model``): the 4-bit checkpoint and ``quantize.json``, what it
  was made from (:func:`write_quantize_record`, :func:`base_model_of`);
* an adapter (``adapter``): peft's files, ``history.json`` and ``train.json``, what it was
  trained on (:func:`write_train_record`, :func:`check_base`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from qlora_kfp.errors import ArtifactError, ProvenanceError
from qlora_kfp.storage.manifest import MANIFEST, verify

log = logging.getLogger(__name__)
DATASET_RECORD = "stats.json"
QUANTIZE_RECORD = "quantize.json"
TRAIN_RECORD = "train.json"


# --- prepared dataset ----------------------------------------------------------------------


def dataset_digest(folder: str | Path) -> str:
    """Digest of the prepared data (train + eval parquet), stable across identical runs."""
    files = json.loads((Path(folder) / MANIFEST).read_text())["files"]
    h = hashlib.sha256()
    for name in ("train.parquet", "eval.parquet"):
        h.update(files[name]["sha256"].encode())
    return h.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    """What a tokenizer's ids mean: its vocabulary (added tokens included) and BOS/EOS ids.
    Not its chat template, which prepare-dataset sets itself."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    meaning = [vocab, tokenizer.bos_token_id, tokenizer.eos_token_id]
    return hashlib.sha256(json.dumps(meaning).encode()).hexdigest()[:16]


def write_dataset_record(folder: str | Path, tokenizer, config: dict, **info) -> None:
    """What a prepared-dataset artifact was made with: the settings (with ``base_model``) and
    the fingerprint of the tokenizer its ids come from, which train, evaluate and quantize
    check their model's tokenizer against. Every writer of the artifact calls it."""
    record = {"config": config, "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), **info}
    (Path(folder) / DATASET_RECORD).write_text(json.dumps(record, indent=1, sort_keys=True))


def check_tokenizer(dataset_dir: str | Path, tokenizer, what: str, advice: str) -> None:
    """Refuse a model whose tokenizer is not the one the dataset was tokenized with: its
    token ids would mean other text, and training and evaluating on them would run.

    Args:
        dataset_dir: A prepared dataset, whose ``stats.json`` records its tokenizer.
        tokenizer: The model's tokenizer.
        what: The model at hand, for the message (``base_model=...``).
        advice: What to do instead.

    Raises:
        ProvenanceError: naming both models and both tokenizers' fingerprints.
    """
    info = _read(Path(dataset_dir) / DATASET_RECORD, "what the dataset was prepared with")
    recorded = info.get("tokenizer_fingerprint")
    if not recorded:  # prepared before the fingerprint was recorded
        log.warning("%s records no tokenizer fingerprint: tokenizer not checked", dataset_dir)
        return
    given = tokenizer_fingerprint(tokenizer)
    if given != recorded:
        made_for = info.get("config", {}).get("base_model", "?")
        raise ProvenanceError(
            f"{dataset_dir}: the dataset was tokenized for base model {made_for} (tokenizer "
            f"{recorded}), but {what} has another tokenizer ({given}); {advice}"
        )


def load_split(folder: str | Path, name: str):
    """``train`` or ``eval`` of a verified prepared dataset as a ``datasets.Dataset``."""
    import datasets

    verify(folder, "dataset")
    return datasets.Dataset.from_parquet(str(Path(folder) / f"{name}.parquet"))


def token_rows(folder: str | Path, split: str) -> list[dict]:
    """``input_ids``/``labels`` of a prepared split, read with pyarrow (no datasets needed)."""
    import pyarrow.parquet as pq

    table = pq.read_table(Path(folder) / f"{split}.parquet", columns=["input_ids", "labels"])
    return table.to_pylist()


# --- quantized model -----------------------------------------------------------------------


def write_quantize_record(folder: str | Path, config: dict, base_fingerprint: str) -> None:
    """What a quantized-model artifact was made from: the settings (with ``base_model``) and
    the base weights' fingerprint, which an adapter trained on it keeps so merge and evaluate
    can check their base against it. Every writer of the artifact calls it."""
    record = {"config": config, "base_model_fingerprint": base_fingerprint}
    (Path(folder) / QUANTIZE_RECORD).write_text(json.dumps(record, indent=1))


def base_model_of(model_dir: str | Path) -> dict:
    """The base model a quantized model was made from and its weights' fingerprint.

    Raises:
        ArtifactError: the artifact has no record (a quantize stage did not write it).
    """
    made = _read(Path(model_dir) / QUANTIZE_RECORD, "what the quantized model was made from")
    return {
        "base_model": made["config"]["base_model"],
        "base_model_fingerprint": made.get("base_model_fingerprint", ""),
    }


# --- adapter -------------------------------------------------------------------------------


def write_train_record(folder: str | Path, config: dict, made_from: dict, base: dict) -> None:
    """What an adapter was trained with and on: its settings, the checkpoints' ``made_from``
    and the quantized model's :func:`base_model_of`."""
    record = {"config": config, "made_from": made_from, **base}
    (Path(folder) / TRAIN_RECORD).write_text(json.dumps(record, indent=1))


def check_base(adapter_dir: str | Path, given: str, what: str, advice: str) -> None:
    """Refuse a base model whose weights' fingerprint is not the one the adapter was trained
    on. Logits of base+adapter agree on *any* base of the right shapes, so only the recorded
    fingerprint can tell.

    Args:
        adapter_dir: The adapter, whose ``train.json`` records its base.
        given: The fingerprint of the base at hand ("" when unknown: not checked).
        what: The base at hand, for the message (``base_model=...``).
        advice: What to do instead.

    Raises:
        ProvenanceError: naming both base models.
    """
    record = _read(Path(adapter_dir) / TRAIN_RECORD, "what the adapter was trained on")
    trained_on = record.get("base_model_fingerprint")
    if not given or not trained_on:
        log.warning("%s or %s records no base fingerprint: base not checked", adapter_dir, what)
        return
    if given != trained_on:
        raise ProvenanceError(
            f"{adapter_dir}: the adapter was trained on base model {record.get('base_model')} "
            f"({trained_on}), but {what} has other weights ({given}); {advice}"
        )


def check_finite_adapter(adapter_dir: str | Path) -> None:
    """Refuse an adapter with a NaN or Inf weight (sealed before the train stage checked its
    weights, or written by hand): base+adapter would score NaN, or worse, finite nonsense.

    Raises:
        ArtifactError: naming the file and the tensor.
    """
    import torch
    from safetensors import safe_open

    for path in sorted(Path(adapter_dir).glob("adapter_model*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                t = f.get_tensor(name)
                bad = int((~torch.isfinite(t)).sum()) if t.is_floating_point() else 0
                if bad:
                    raise ArtifactError(
                        f"{path}: tensor {name} holds {bad} NaN or Inf values of {t.numel()}; "
                        "the adapter diverged: train it again (lower learning_rate, keep "
                        "max_grad_norm small)"
                    )


def _read(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        stages = {QUANTIZE_RECORD: "quantize", DATASET_RECORD: "prepare"}
        stage = stages.get(path.name, "train")
        raise ArtifactError(
            f"{path}: cannot read {what} ({type(exc).__name__}); write it with the {stage} stage"
        ) from None
