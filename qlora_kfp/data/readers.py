"""Read raw dataset rows from JSONL, JSON, CSV or Parquet, with file and row in every error.

Rows are numbered from 1 as a person counts them: the line for JSONL, the data row for CSV
(the header is not counted), the list index + 1 for JSON and Parquet.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

from qlora_kfp.errors import DataError, SourceError
from qlora_kfp.storage import sources

FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}

Row = tuple[str, int, dict]  # (file, row number, record)


def detect_format(path: Path, data_format: str) -> str:
    if data_format != "auto":
        return data_format
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"unknown format '{path.suffix or '(no extension)'}'; use one of "
            f"{', '.join(sorted(FORMATS))} or set data_format",
            source=str(path),
        )
    return fmt


def _jsonl(path: Path) -> Iterator[Row]:
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"not UTF-8 text (byte {exc.start + 1})", source=str(path), row=n
                ) from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"malformed JSON ({exc.msg} at column {exc.colno})", source=str(path), row=n
                ) from None
            yield str(path), n, rec


def _json(path: Path) -> Iterator[Row]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(
            f"malformed JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})", source=str(path)
        ) from None
    if isinstance(data, dict):
        # {"data": [...]} / {"train": [...]} are common wrappers.
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(
                "expected a list of records or an object holding one list", source=str(path)
            )
        data = lists[0]
    if not isinstance(data, list):
        raise DataError("expected a list of records", source=str(path))
    for n, rec in enumerate(data, 1):
        yield str(path), n, rec


def _csv(path: Path) -> Iterator[Row]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        for n, rec in enumerate(reader, 1):
            if None in rec:  # more cells than header columns
                raise DataError(
                    f"{len(rec) - 1 + len(rec[None])} cells but the header has "
                    f"{len(reader.fieldnames or [])} columns",
                    source=str(path),
                    row=n,
                )
            yield str(path), n, rec


def _parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many types for bad files
        raise DataError(f"not a readable Parquet file ({exc})", source=str(path)) from None
    for n, rec in enumerate(table.to_pylist(), 1):
        yield str(path), n, rec


READERS = {"jsonl": _jsonl, "json": _json, "csv": _csv, "parquet": _parquet}


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FORMATS)
    if not files:
        raise SourceError(f"{path}: folder holds no {', '.join(sorted(FORMATS))} files")
    return files


def _guard_encoding(rows: Iterator[Row], path: Path) -> Iterator[Row]:
    """Turn a decoding error anywhere in a text file into a DataError naming the file."""
    try:
        yield from rows
    except UnicodeDecodeError as exc:
        raise DataError(f"not UTF-8 text (byte {exc.start + 1})", source=str(path)) from None


def read_rows(source: str, data_format: str = "auto") -> Iterator[Row]:
    """Yield ``(file, row, record)`` for every record of a local path, s3:// URI or hub id."""
    local = sources.localize(source)
    path = Path(local)
    if path.exists():
        for f in _files(path):
            fmt = detect_format(f, data_format)
            for file, n, rec in _guard_encoding(READERS[fmt](f), f):
                if not isinstance(rec, dict):
                    raise DataError(
                        f"expected an object, got {type(rec).__name__}", source=file, row=n
                    )
                yield file, n, rec
        return
    if not sources.is_hub_id(local):
        raise SourceError(f"{source}: no such file or folder, and not a hub dataset id")
    yield from _hub(source)


def _hub(dataset_id: str) -> Iterator[Row]:
    import datasets

    try:
        ds = datasets.load_dataset(dataset_id, split="train")
    except Exception as exc:  # noqa: BLE001 - hub, network and format errors alike
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SourceError(f"{dataset_id}: cannot load from the hub ({msg})") from None
    for n, rec in enumerate(ds, 1):
        yield f"hub:{dataset_id}", n, rec
