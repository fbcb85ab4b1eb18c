"""Read raw dataset rows from JSONL, JSON, CSV or Parquet, with file and row in every error.

Rows are numbered from 1 as a person counts them: the line for JSONL, the data row for CSV
(the header is not counted), the list index + 1 for JSON and Parquet. A UTF-8 byte order mark
(Excel, Notepad) is accepted. Error messages name the file, row and field and say what is
wrong, but never quote the file's contents: they end up in logs and MLflow tags.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from qlora_kfp.data.listing import FORMATS, Listing, list_files
from qlora_kfp.errors import DataError, SourceError
from qlora_kfp.storage import sources

Row = tuple[str, int, dict]  # (file, row number, record)
BOM = "\ufeff"


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


def _json_error(exc: json.JSONDecodeError) -> str:
    # The stdlib's messages are fixed texts, but the pure-Python scanner appends the bad
    # escape (`Invalid \\escape: 'x'`): keep only the part before any quoted content.
    return exc.msg.split(":")[0]


def _jsonl(path: Path) -> Iterator[Row]:
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").lstrip(BOM)  # a BOM on line 1, or on each `cat`ed file
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"not UTF-8 text (byte {exc.start + 1} of the line); save the file as UTF-8",
                    source=str(path),
                    row=n,
                ) from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"malformed JSON ({_json_error(exc)} at column {exc.colno})",
                    source=str(path),
                    row=n,
                ) from None
            except (ValueError, RecursionError) as exc:  # 4300+ digit numbers, deep nesting
                raise DataError(
                    f"unreadable JSON ({_limit(exc)})", source=str(path), row=n
                ) from None
            yield str(path), n, rec


def _limit(exc: BaseException) -> str:
    return "nested too deeply" if isinstance(exc, RecursionError) else "a number too long"


def _json(path: Path) -> Iterator[Row]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    except json.JSONDecodeError as exc:
        # A .json file of one object per line is JSON Lines under the wrong name.
        hint = "; one object per line is JSONL: name it .jsonl" if exc.msg == "Extra data" else ""
        raise DataError(
            f"malformed JSON ({_json_error(exc)} at line {exc.lineno}, column {exc.colno}){hint}",
            source=str(path),
        ) from None
    except (ValueError, RecursionError) as exc:
        raise DataError(f"unreadable JSON ({_limit(exc)})", source=str(path)) from None
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
    # A long answer is a legitimate cell: lift the csv module's 128 KiB field limit.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    # utf-8-sig: Excel's "CSV UTF-8" starts with a BOM, which would otherwise become part of
    # the first header (`\ufeffprompt`) and hide that column.
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        n = 0
        try:
            for n, rec in enumerate(reader, 1):  # noqa: B007 - n is read in the except
                if None in rec:  # more cells than header columns
                    raise DataError(
                        f"{len(rec) - 1 + len(rec[None])} cells but the header has "
                        f"{len(reader.fieldnames or [])} columns",
                        source=str(path),
                        row=n,
                    )
                yield str(path), n, rec
        except csv.Error as exc:
            # The csv module's messages describe the problem, never the cell's text.
            msg = str(exc).split(" - ")[0]
            raise DataError(f"malformed CSV ({msg})", source=str(path), row=n + 1) from None


def _parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many types for bad files
        # The type only: pyarrow's messages may quote bytes of the file.
        raise DataError(
            f"not a readable Parquet file ({type(exc).__name__})", source=str(path)
        ) from None
    for n, rec in enumerate(table.to_pylist(), 1):
        yield str(path), n, rec


READERS = {"jsonl": _jsonl, "json": _json, "csv": _csv, "parquet": _parquet}


def not_utf8(path: Path) -> DataError:
    """A DataError naming the first line of ``path`` that is not UTF-8 (never its bytes)."""
    with open(path, "rb") as f:
        # Line by line is exact: the newline byte never occurs inside a UTF-8 sequence.
        for n, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                return DataError(
                    f"not UTF-8 text at line {n} (byte {exc.start + 1} of the line); save the "
                    "file as UTF-8 (Excel: CSV UTF-8)",
                    source=str(path),
                )
    return DataError("not UTF-8 text; save the file as UTF-8", source=str(path))


def _guard_encoding(rows: Iterator[Row], path: Path) -> Iterator[Row]:
    """Turn a decoding error anywhere in a text file into a DataError naming file and line."""
    try:
        yield from rows
    except UnicodeDecodeError:
        raise not_utf8(path) from None


class DataSource:
    """The files of a dataset source and their rows; records what was read and skipped.

    Args:
        source: A local file or folder, an ``s3://`` URI or a hub dataset id.
        data_format: ``auto`` (by extension) or the format of every file read.

    Raises:
        SourceError: the source does not exist.
        DataError: a folder holds no data file.
    """

    def __init__(self, source: str, data_format: str = "auto"):
        self.source, self.data_format = source, data_format
        path = Path(sources.localize(source))
        self.hub = not path.exists()
        if self.hub and not sources.is_hub_id(str(path)):
            raise SourceError(f"{source}: no such file or folder, and not a hub dataset id")
        self.listing = Listing(path) if self.hub else list_files(path, data_format)
        self.rows_per_file: dict[str, int] = {}

    def rows(self) -> Iterator[Row]:
        """Yield ``(file, row, record)`` for every record, file by file."""
        if self.hub:
            yield from self._count(f"hub:{self.source}", _hub(self.source))
            return
        for f in self.listing.files:
            fmt = detect_format(f, self.data_format)
            yield from self._count(self.listing.name(f), _guard_encoding(READERS[fmt](f), f))

    def _count(self, name: str, rows: Iterator[Row]) -> Iterator[Row]:
        self.rows_per_file[name] = 0
        for file, n, rec in rows:
            if not isinstance(rec, dict):
                raise DataError(f"expected an object, got {type(rec).__name__}", source=file, row=n)
            yield file, n, rec
            self.rows_per_file[name] += 1  # after the yield: a row max_rows stops at is not read

    def summary(self) -> dict:
        """``{"read": [{"file", "rows"}], "skipped": [{"file", "reason"}]}`` for stats.json;
        files ``max_rows`` stopped before have ``rows: None``."""
        names = [f"hub:{self.source}"] if self.hub else map(self.listing.name, self.listing.files)
        return {
            "read": [{"file": n, "rows": self.rows_per_file.get(n)} for n in names],
            "skipped": list(self.listing.skipped),
        }


def read_rows(source: str, data_format: str = "auto") -> Iterator[Row]:
    """Yield ``(file, row, record)`` for every record of a local path, s3:// URI or hub id."""
    yield from DataSource(source, data_format).rows()


def _hub(dataset_id: str) -> Iterator[Row]:
    import datasets

    try:
        ds = datasets.load_dataset(dataset_id, split="train")
    except Exception as exc:  # noqa: BLE001 - hub, network and format errors alike
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        # Up to the first ": " only: parse errors go on to quote the data (pyarrow's CSV
        # reader: "CSV parse error: Expected 2 columns, got 3: <the row>").
        raise SourceError(
            f"{dataset_id}: cannot load from the hub ({msg.split(': ')[0]})"
        ) from None
    for n, rec in enumerate(ds, 1):
        yield f"hub:{dataset_id}", n, rec
