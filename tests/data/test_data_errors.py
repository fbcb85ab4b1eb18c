"""One-line data errors that name file, row and field, and never quote the user's data.

Messages end up in logs and in MLflow's ``failure_reason`` tag: nothing of a file's text may be
in them. Each case below hides a secret-looking string where a careless message would echo it.
"""

from __future__ import annotations

import json

import pytest

from qlora_kfp.configs import PrepareConfig
from qlora_kfp.data.readers import read_rows
from qlora_kfp.data.schema import to_messages
from qlora_kfp.errors import DataError, QloraError
from qlora_kfp.stages.prepare import run_prepare

SECRET = "sk-live-51HxQz9d2TkQp"
OK = '{"prompt": "a", "completion": "b"}\n'


def chat(*turns) -> str:
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]}) + "\n"


def parquet_bytes() -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({"prompt": [SECRET], "completion": [SECRET]}), buf)
    raw = buf.getvalue()
    return raw[: len(raw) // 2] + SECRET.encode() + raw[-8:]  # torn in the middle


CASES = [
    # (case, file name, content, fragments the one-line message must hold)
    (
        "malformed-jsonl",
        "data.jsonl",
        OK + f'{{"prompt": "{SECRET}", "completion": }}\n',
        ["data.jsonl, row 2", "malformed JSON (Expecting value at column"],
    ),
    (
        "bad-escape",
        "data.jsonl",
        OK + f'{{"prompt": "\\{SECRET}"}}\n',
        ["row 2", "malformed JSON (Invalid"],
    ),
    (
        "malformed-json",
        "data.json",
        f'[{{"prompt": "{SECRET}",]',
        ["data.json", "malformed JSON", "line 1"],
    ),
    (
        "secret-as-role",
        "data.jsonl",
        chat((SECRET, "x"), ("assistant", "y")),
        ["row 1, field 'messages[0].role'", "role is not one of system, user, assistant"],
    ),
    (
        "secret-as-key",
        "data.jsonl",
        json.dumps({SECRET: "x", "Prompt": "y"}) + "\n",
        ["row 1", "no known schema; keys: 'Prompt', 1 other"],
    ),
    (
        "csv-without-header",
        "data.csv",
        f"{SECRET},answer\nq,a\n",
        [
            "data.csv, row 1",
            "no known schema; keys: 'answer', 1 other",
            "first line must be the header",
        ],
    ),
    (
        "secret-as-part-type",
        "data.jsonl",
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": [{"type": SECRET, "text": "x"}]},
                    {"role": "assistant", "content": "y"},
                ]
            }
        )
        + "\n",
        ["field 'messages[0].content[0].type'", "this part's type is not 'text'"],
    ),
    (
        "not-utf8-jsonl",
        "data.jsonl",
        OK.encode() + b'{"prompt": "' + SECRET.encode() + b'\xff\xfe"}\n',
        ["data.jsonl, row 2", "not UTF-8 text (byte 34 of the line)"],
    ),
    (
        "not-utf8-csv",
        "data.csv",
        b"prompt,completion\nq,a\nq," + SECRET.encode() + b"\xe9\n",
        ["data.csv", "not UTF-8 text at line 3 (byte", "save the file as UTF-8"],
    ),
    (
        "not-utf8-json",
        "data.json",
        b'[{"prompt": "a",\n "completion": "' + SECRET.encode() + b'\x92"}]',
        ["data.json", "not UTF-8 text at line 2"],
    ),
    (
        "lone-surrogate",
        "data.jsonl",
        OK + '{"prompt": "\\ud800' + SECRET + '", "completion": "b"}\n',
        ["row 2, field 'prompt'", "not valid Unicode (an unpaired surrogate at character 1)"],
    ),
    (
        "jsonl-named-json",
        "data.json",
        OK + OK,
        ["data.json", "Extra data at line 2", "name it .jsonl"],
    ),
    ("deep-nesting", "data.json", "[" * 100_000 + SECRET, ["data.json", "nested too deeply"]),
    (
        "huge-number",
        "data.jsonl",
        OK + '{"prompt": ' + "7" * 5000 + "}\n",
        ["row 2", "a number too long"],
    ),
    (
        "no-user-turn",
        "data.jsonl",
        OK + chat(("system", SECRET), ("assistant", "y")),
        ["row 2, field 'messages'", "no user turn"],
    ),
    (
        "only-the-answer",
        "data.jsonl",
        chat(("assistant", SECRET)),
        ["row 1, field 'messages'", "no user turn"],
    ),
    (
        "torn-parquet",
        "data.parquet",
        parquet_bytes(),
        ["data.parquet", "not a readable Parquet file ("],
    ),
    (
        "messages-and-alpaca",
        "data.jsonl",
        OK
        + json.dumps(
            {
                "messages": [
                    {"role": "user", "content": SECRET},
                    {"role": "assistant", "content": "y"},
                ],
                "instruction": SECRET,
                "output": "z",
            }
        )
        + "\n",
        ["data.jsonl, row 2", "both 'messages' and 'instruction'+'output'", "keep one"],
    ),
    (
        "alpaca-and-prompt-completion",
        "data.csv",
        f"instruction,output,prompt,completion\n{SECRET},a,q,b\n",
        ["data.csv, row 1", "both 'instruction'+'output' and 'prompt'+'completion'"],
    ),
    (
        "csv-extra-cell",
        "data.csv",
        f"prompt,completion\na,b,{SECRET}\n",
        ["data.csv, row 1", "3 cells"],
    ),
]


@pytest.mark.parametrize(
    "name,content,fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_rows_give_one_line_errors_without_the_files_text(
    name, content, fragments, tmp_path, demo_assets
):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    cfg = PrepareConfig(data_source=str(path), base_model=demo_assets["base_model"])
    with pytest.raises(DataError) as err:
        run_prepare(cfg, str(tmp_path / "out"))
    msg = str(err.value)
    assert SECRET not in msg and SECRET[3:11] not in msg, msg
    assert "\n" not in msg, "one line"
    for fragment in fragments:
        assert fragment in msg
    assert not (tmp_path / "out").exists()


def test_a_csv_cell_over_the_csv_modules_limit_is_read(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("prompt,completion\nq," + "a" * 200_000 + "\n")
    ((_, _, rec),) = list(read_rows(str(path)))
    assert len(rec["completion"]) == 200_000


def test_a_known_word_in_the_wrong_place_is_named(tmp_path):
    """Naming a role or key from another format's vocabulary helps and leaks nothing."""
    path = tmp_path / "data.jsonl"
    path.write_text(chat(("human", "q"), ("gpt", "a")))
    ((file, row, rec),) = list(read_rows(str(path)))
    with pytest.raises(QloraError, match=r"role 'human' is not one of system, user, assistant"):
        to_messages(rec, file, row)
    with pytest.raises(QloraError, match=r"keys: 'conversations'\. Expected 'messages'"):
        to_messages({"conversations": []}, file, row)


def test_a_hub_loading_error_does_not_quote_the_data(monkeypatch, demo_assets, tmp_path):
    import datasets
    import pyarrow as pa

    def load_dataset(*args, **kwargs):
        # What pyarrow's CSV reader raises for a ragged row (arrow/csv/parser.cc: "Expected %d
        # columns, got %d: %s", the row last), through datasets.load_dataset.
        raise pa.ArrowInvalid(f"CSV parse error: Expected 2 columns, got 3: q,{SECRET},x")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    cfg = PrepareConfig(data_source="someone/ragged", base_model=demo_assets["base_model"])
    with pytest.raises(QloraError) as err:
        run_prepare(cfg, str(tmp_path / "out"))
    assert "someone/ragged: cannot load from the hub (CSV parse error)" in str(err.value)
    assert SECRET not in str(err.value)


@pytest.mark.parametrize(
    "rec,expected",
    [
        pytest.param(
            {"instruction": None, "output": None, "prompt": "q", "completion": "a"},
            "q",
            id="parquet-null-alpaca-columns",
        ),
        pytest.param(
            {"instruction": "", "output": " ", "prompt": "q", "completion": "a"},
            "q",
            id="csv-empty-alpaca-cells",
        ),
        pytest.param(
            {"messages": None, "instruction": "q", "output": "a"}, "q", id="null-messages"
        ),
    ],
)
def test_a_table_mixing_schemas_uses_the_one_each_row_fills(rec, expected):
    """Parquet fills another schema's columns with nulls, CSV with empty cells: not two
    schemas in one row, but one row of a table that mixes them."""
    assert to_messages(rec, "data.parquet", 1)[0]["content"] == expected
