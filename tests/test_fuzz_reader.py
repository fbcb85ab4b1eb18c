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
