"""Fuzz the dataset reader: any bytes in, either rows out or a QloraError naming the file."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qlora_kfp.data.readers import read_rows
from qlora_kfp.data.schema import to_messages
from qlora_kfp.errors import QloraError

SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "prompt",
                    "completion",
                    "instruction",
                    "input",
                    "output",
                    "messages",
                    "role",
                    "content",
                    "x",
                ]
            ),
            inner,
            max_size=4,
        )
    ),
    max_leaves=12,
)


def consume(path: str, fmt: str) -> int:
    n = 0
    for file, row, rec in read_rows(path, fmt):
        to_messages(rec, file, row)
        n += 1
    return n


@SETTINGS
@given(raw=st.binary(max_size=400))
def test_arbitrary_bytes_never_escape_as_library_errors(raw, tmp_path_factory):
    for fmt in ("jsonl", "json", "csv", "parquet"):
        path = tmp_path_factory.mktemp("fz") / f"data.{fmt}"
        path.write_bytes(raw)
        try:
            consume(str(path), fmt)
        except QloraError as exc:
            assert str(path) in str(exc) or "data." in str(exc)
        except UnicodeDecodeError:
            raise AssertionError(f"{fmt}: undecodable bytes must be a DataError") from None


@SETTINGS
@given(records=st.lists(json_values, min_size=1, max_size=5))
def test_arbitrary_json_records_give_rows_or_a_clear_error(records, tmp_path_factory):
    path = tmp_path_factory.mktemp("fz") / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    try:
        assert consume(str(path), "jsonl") == len(records)
    except QloraError as exc:
        assert "data.jsonl, row " in str(exc)


# Words no vocabulary of ours holds ("zq" + consonants): any of them in a message is a leak.
secrets = st.text(alphabet="bcdfghjklmnpqrstvwx", min_size=6, max_size=10).map(lambda s: "zq" + s)
keys = st.sampled_from(
    ["prompt", "completion", "instruction", "output", "messages", "role", "content", "type", "text"]
)
leaky_values = st.recursive(
    st.none() | st.integers() | secrets,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys | secrets, inner, max_size=4),
    max_leaves=10,
)


def strings_in(value) -> set[str]:
    if isinstance(value, str):
        return {value}
    if isinstance(value, dict):
        return set().union(*(strings_in(k) | strings_in(v) for k, v in value.items()))
    if isinstance(value, list):
        return set().union(*map(strings_in, value))
    return set()


@SETTINGS
@given(records=st.lists(leaky_values, min_size=1, max_size=4))
def test_error_messages_never_quote_the_files_text(records, tmp_path_factory):
    """Messages go to logs and MLflow tags: no string of the file may appear in one."""
    path = tmp_path_factory.mktemp("fz") / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    try:
        consume(str(path), "jsonl")
    except QloraError as exc:
        leaked = [s for s in strings_in(records) if s.startswith("zq") and s in str(exc)]
        assert not leaked, str(exc)


@SETTINGS
@given(header=st.lists(keys | secrets, min_size=1, max_size=3), cells=st.lists(secrets, max_size=6))
def test_csv_error_messages_never_quote_the_files_text(header, cells, tmp_path_factory):
    path = tmp_path_factory.mktemp("fz") / "data.csv"
    path.write_text(",".join(header) + "\n" + ",".join(cells) + "\n")
    try:
        consume(str(path), "csv")
    except QloraError as exc:
        leaked = [s for s in header + cells if s.startswith("zq") and s in str(exc)]
        assert not leaked, str(exc)
