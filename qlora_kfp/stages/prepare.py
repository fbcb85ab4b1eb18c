"""Stage 1, prepare-dataset: read, validate, render, tokenize, dedupe, split, save."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass

from qlora_kfp.configs import PrepareConfig
from qlora_kfp.data import readers, schema, splitting, templates
from qlora_kfp.data.specials import SpecialText
from qlora_kfp.errors import DataError
from qlora_kfp.storage import artifacts
from qlora_kfp.storage.manifest import atomic_folder, check_output
from qlora_kfp.storage.writes import output_lock

log = logging.getLogger(__name__)
COLUMNS = ("input_ids", "labels", "prompt", "reference", "prompt_ids")


@dataclass
class PrepareResult:
    """What prepare-dataset produced: the artifact folder, its statistics and its digest."""

    path: str
    stats: dict
    digest: str


def _percentiles(lengths: list[int]) -> dict[str, float]:
    if not lengths:
        return {}
    s = sorted(lengths)
    pick = lambda q: float(s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))])  # noqa: E731
    return {
        "tokens_p50": pick(0.5),
        "tokens_p90": pick(0.9),
        "tokens_p99": pick(0.99),
        "tokens_max": float(s[-1]),
        "tokens_mean": round(sum(s) / len(s), 2),
    }


def encode_rows(cfg: PrepareConfig, tokenizer) -> tuple[list[templates.Encoded], dict]:
    """Read and encode every row, validating all of it before returning (fail before work).

    Returns the encoded rows (each with its prompt keys, for :func:`split`) and the statistics;
    ``stats["files"]`` lists the files read (with their row counts) and those skipped (with the
    reason): no file is left out silently.
    """
    stats: dict = dict(
        rows_read=0, dropped_duplicate=0, dropped_too_long=0, dropped_no_target=0, truncated=0
    )
    data = readers.DataSource(cfg.data_source, cfg.data_format)
    special = SpecialText(tokenizer)
    seen: set[str] = set()
    out: list[templates.Encoded] = []
    for file, row, rec in data.rows():
        if cfg.max_rows and stats["rows_read"] >= cfg.max_rows:
            break
        stats["rows_read"] += 1
        messages = schema.to_messages(rec, file, row)
        if cfg.dedupe:
            key = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()
            if key in seen:
                stats["dropped_duplicate"] += 1
                continue
            seen.add(key)
        try:
            enc = templates.encode(
                tokenizer,
                messages,
                cfg.max_seq_length,
                cfg.train_on_prompt,
                truncate=cfg.overlong == "truncate",
                special=special,
            )
        except DataError as exc:
            if exc.source:
                raise
            raise DataError(str(exc), source=file, row=row) from None
        if enc is None:
            stats["dropped_too_long"] += 1
            continue
        if all(label == templates.IGNORE for label in enc.labels):
            stats["dropped_no_target"] += 1  # truncation cut every completion token
            continue
        stats["truncated"] += enc.truncated
        enc.prompt_key = splitting.prompt_keys(messages)
        out.append(enc)
    files = data.summary()
    stats.update(files_read=len(files["read"]), files_skipped=len(files["skipped"]))
    log.info("read %s", files)
    if stats["rows_read"] == 0:
        raise DataError("the dataset has no rows", source=cfg.data_source)
    if not out:
        raise DataError(
            f"no rows left after filtering ({stats}); raise max_seq_length (now "
            f"{cfg.max_seq_length}) or set overlong=truncate",
            source=cfg.data_source,
        )
    stats["files"] = files
    return out, stats


def split(rows: list[templates.Encoded], cfg: PrepareConfig) -> tuple[list, list, dict]:
    """Seeded train/eval split by prompt (:mod:`qlora_kfp.data.splitting`): all rows of one
    prompt land on the same side, so no eval prompt is seen in training.

    Returns:
        ``(train, eval, counts)``, counts being the prompt-group statistics.

    Raises:
        DataError: when the eval split would be smaller than ``min_eval_rows``.
    """
    res = splitting.split_by_prompt(
        [r.prompt_key for r in rows],
        cfg.eval_fraction,
        cfg.min_eval_rows,
        cfg.seed,
        cfg.data_source,
    )
    return [rows[i] for i in res.train], [rows[i] for i in res.eval], res.stats


def run_prepare(cfg: PrepareConfig, output_dir: str) -> PrepareResult:
    """Prepare a tokenized train/eval dataset under ``output_dir`` (atomically).

    Args:
        cfg: The stage configuration.
        output_dir: Folder to create; it holds ``train.parquet``, ``eval.parquet``,
            ``stats.json``, the tokenizer and ``MANIFEST.json``.

    Returns:
        The folder, the statistics (also logged as KFP/MLflow metrics) and a content digest.
    """
    # Refuse an output that is not ours before any long work (atomic_folder checks again).
    check_output(output_dir, "dataset", (cfg.data_source, cfg.base_model))
    # One run at a time writes it: a second is refused here, before any work.
    with output_lock(output_dir):
        return _prepare(cfg, output_dir)


def _prepare(cfg: PrepareConfig, output_dir: str) -> PrepareResult:
    import datasets

    from qlora_kfp.storage.sources import load_tokenizer

    tokenizer = load_tokenizer(cfg.base_model, cfg.trust_remote_code)
    template = templates.apply_template(tokenizer, cfg.chat_template)
    rows, stats = encode_rows(cfg, tokenizer)
    train, evals, counts = split(rows, cfg)
    stats.update(
        **counts,
        rows_kept=len(rows),
        train_rows=len(train),
        eval_rows=len(evals),
        **_percentiles([len(r.input_ids) for r in rows]),
    )
    stats["label_tokens"] = sum(sum(x != templates.IGNORE for x in r.labels) for r in rows)
    log.info("prepared %s", stats)
    with atomic_folder(output_dir, "dataset") as tmp:
        for name, part in (("train", train), ("eval", evals)):
            cols = {c: [getattr(r, c) for r in part] for c in COLUMNS}
            datasets.Dataset.from_dict(cols).to_parquet(str(tmp / f"{name}.parquet"))
        tokenizer.save_pretrained(tmp / "tokenizer")
        (tmp / "rendered_samples.txt").write_text(render_samples(tokenizer, train[:3]))
        artifacts.write_dataset_record(
            tmp, tokenizer, asdict(cfg), chat_template_used=template, stats=stats
        )
    digest = artifacts.dataset_digest(output_dir)
    return PrepareResult(str(output_dir), stats, digest)


def render_samples(tokenizer, rows: list[templates.Encoded]) -> str:
    """Rows as training sees them: masked tokens in [brackets], trained tokens plain, so a
    person can check that the answer and the EOS token are learned and the prompt is not."""
    out = []
    for i, r in enumerate(rows):
        parts, masked, buf = [], None, []
        for tok, lab in zip(r.input_ids, r.labels, strict=True):
            m = lab == templates.IGNORE
            if masked is not None and m != masked:
                text = tokenizer.decode(buf)
                parts.append(f"[{text}]" if masked else text)
                buf = []
            masked = m
            buf.append(tok)
        if buf:
            text = tokenizer.decode(buf)
            parts.append(f"[{text}]" if masked else text)
        out.append(f"--- row {i} ({len(r.input_ids)} tokens; [masked]) ---\n{''.join(parts)}")
    return "\n".join(out) + "\n"
