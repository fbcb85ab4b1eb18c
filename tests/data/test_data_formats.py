"""Data as users bring it: byte order marks, content parts, folders with more than data."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from qlora_kfp.configs import PrepareConfig
from qlora_kfp.errors import DataError
from qlora_kfp.stages.prepare import encode_rows, run_prepare

ROWS = [{"prompt": f"Opposite of: w{i}", "completion": f"a{i}"} for i in range(20)]


def cfg(path, base, **kw):
    return PrepareConfig(data_source=str(path), base_model=base, max_seq_length=64, **kw)


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def excel_csv(rows) -> str:
    """CSV as Excel's "CSV UTF-8" writes it: a BOM, then CRLF line ends."""
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\r\n")
    w.writeheader()
    w.writerows(rows)
    return "\ufeff" + buf.getvalue()


BOM_FILES = [
    ("jsonl-bom", "data.jsonl", "\ufeff" + jsonl(ROWS)),
    ("json-bom", "data.json", "\ufeff" + json.dumps(ROWS)),
    ("excel-csv-bom", "data.csv", excel_csv(ROWS)),
    # `cat a.jsonl b.jsonl` of two files written with a BOM: one in the middle too.
    ("jsonl-bom-mid-file", "data.jsonl", "\ufeff" + jsonl(ROWS[:10]) + "\ufeff" + jsonl(ROWS[10:])),
]


@pytest.mark.parametrize("name,text", [c[1:] for c in BOM_FILES], ids=[c[0] for c in BOM_FILES])
def test_utf8_with_a_byte_order_mark_reads_every_row(name, text, tmp_path, demo_assets, tokenizer):
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    rows, stats = encode_rows(cfg(path, demo_assets["base_model"]), tokenizer)
    assert stats["rows_read"] == 20
    assert {r.reference for r in rows} == {f"a{i}" for i in range(20)}


def chat(user_content, answer="cold") -> dict:
    return {
        "messages": [
            {"role": "user", "content": user_content},
            {"role": "assistant", "content": answer},
        ]
    }


def test_content_as_a_list_of_text_parts_is_joined(write_rows, demo_assets, tokenizer):
    parts = [{"type": "text", "text": "What is the opposite of"}, {"type": "text", "text": "hot?"}]
    answer = [{"type": "text", "text": "cold"}]
    path = write_rows([chat(parts, answer)])
    (enc,), _ = encode_rows(cfg(path, demo_assets["base_model"]), tokenizer)
    # Joined with a newline, as vLLM joins the text parts of one message when serving.
    assert "user\nWhat is the opposite of\nhot?<|im_end|>" in enc.prompt
    assert enc.reference == "cold"


NON_TEXT = [
    # (case, content, field, message fragment)
    (
        "image-part",
        [{"type": "text", "text": "x"}, {"type": "image_url", "image_url": {}}],
        "messages[0].content[1].type",
        "only text parts can be trained on; this part's type is 'image_url'",
    ),
    ("part-without-type", [{"text": "x"}], "messages[0].content[0].type", "only text parts"),
    ("part-not-an-object", ["x"], "messages[0].content[0]", "expected a part object"),
    (
        "part-text-not-text",
        [{"type": "text", "text": 3}],
        "messages[0].content[0].text",
        "expected text, got int",
    ),
    ("no-parts", [], "messages[0].content", "missing or empty"),
    (
        "content-a-number",
        7,
        "messages[0].content",
        "expected text or a list of text parts, got int",
    ),
]


@pytest.mark.parametrize(
    "content,field,fragment", [c[1:] for c in NON_TEXT], ids=[c[0] for c in NON_TEXT]
)
def test_content_parts_that_are_not_text_name_the_part(
    content, field, fragment, write_rows, demo_assets, tokenizer
):
    path = write_rows([chat("fine")] + [chat(content)])
    with pytest.raises(DataError) as err:
        encode_rows(cfg(path, demo_assets["base_model"]), tokenizer)
    assert f"data.jsonl, row 2, field '{field}': " in str(err.value)
    assert fragment in str(err.value)


BLANK = [
    # (case, row, field): an answer (or prompt) of whitespace is an error, as an empty one is
    ("completion-spaces", {"prompt": "q", "completion": "  \n\t "}, "completion"),
    ("alpaca-output-newlines", {"instruction": "q", "output": "\n\n"}, "output"),
    ("chat-answer-nbsp", chat("q", "\u00a0 "), "messages[1].content"),
    ("chat-answer-parts-blank", chat("q", [{"type": "text", "text": " "}]), "messages[1].content"),
    ("prompt-spaces", {"prompt": "   ", "completion": "a"}, "prompt"),
]


@pytest.mark.parametrize("row,field", [c[1:] for c in BLANK], ids=[c[0] for c in BLANK])
def test_whitespace_only_text_is_a_clear_error(row, field, write_rows, demo_assets, tokenizer):
    path = write_rows([ROWS[0], row])
    with pytest.raises(DataError) as err:
        encode_rows(cfg(path, demo_assets["base_model"]), tokenizer)
    assert f"row 2, field '{field}': only whitespace" in str(err.value)


def test_an_empty_optional_alpaca_input_is_left_out(write_rows, demo_assets, tokenizer):
    path = write_rows([{"instruction": "Opposite of: hot", "input": "  ", "output": "cold"}])
    (enc,), _ = encode_rows(cfg(path, demo_assets["base_model"]), tokenizer)
    assert "user\nOpposite of: hot<|im_end|>" in enc.prompt


def dataset_folder(root: Path) -> Path:
    """A folder as a hub clone or a Mac leaves it: data, metadata, hidden files, other formats."""
    (root / "data").mkdir(parents=True)
    (root / "data" / "train.jsonl").write_text(jsonl(ROWS[:12]))
    (root / "data" / "more.csv").write_text(excel_csv(ROWS[12:]))
    (root / "README.md").write_text("---\nlicense: mit\n---\n# antonyms\n")
    (root / "dataset_infos.json").write_text(json.dumps({"default": {"features": {}}}))
    (root / ".gitattributes").write_text("*.jsonl filter=lfs\n")
    (root / ".git" / "objects").mkdir(parents=True)
    (root / ".git" / "objects" / "pack.json").write_text("not json")
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1\xff\xfe")
    (root / "data" / "._train.jsonl").write_bytes(b"\x00\x05\x16\x07\xff\xfe")  # AppleDouble
    (root / "notes.txt").write_text("hand-written notes")
    return root


def test_a_folder_reads_only_its_data_files_and_lists_the_rest(tmp_path, demo_assets, tokenizer):
    root = dataset_folder(tmp_path / "ds")
    rows, stats = encode_rows(cfg(root, demo_assets["base_model"]), tokenizer)
    assert len(rows) == 20
    assert stats["files"]["read"] == [
        {"file": "data/more.csv", "rows": 8},
        {"file": "data/train.jsonl", "rows": 12},
    ]
    assert stats["files"]["skipped"] == [
        {"file": ".DS_Store", "reason": "hidden"},
        {"file": ".git/", "reason": "hidden"},
        {"file": ".gitattributes", "reason": "hidden"},
        {"file": "README.md", "reason": "not a data file (.md)"},
        {"file": "data/._train.jsonl", "reason": "hidden"},
        {"file": "dataset_infos.json", "reason": "dataset metadata"},
        {"file": "notes.txt", "reason": "not a data file (.txt)"},
    ]
    assert (stats["files_read"], stats["files_skipped"]) == (2, 7)


def test_stats_json_records_which_files_were_read_and_skipped(tmp_path, demo_assets):
    root = dataset_folder(tmp_path / "ds")
    res = run_prepare(cfg(root, demo_assets["base_model"]), str(tmp_path / "out"))
    info = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert [f["file"] for f in info["stats"]["files"]["read"]] == [
        "data/more.csv",
        "data/train.jsonl",
    ]
    assert {"file": "README.md", "reason": "not a data file (.md)"} in info["stats"]["files"][
        "skipped"
    ]
    assert res.stats["files_skipped"] == 7


def test_a_forced_data_format_skips_the_other_formats_and_says_so(tmp_path, demo_assets, tokenizer):
    root = dataset_folder(tmp_path / "ds")
    _, stats = encode_rows(cfg(root, demo_assets["base_model"], data_format="jsonl"), tokenizer)
    assert stats["files"]["read"] == [{"file": "data/train.jsonl", "rows": 12}]
    assert {"file": "data/more.csv", "reason": "a csv file, but data_format=jsonl"} in stats[
        "files"
    ]["skipped"]


def test_a_folder_with_no_data_file_left_fails_and_names_what_it_skipped(
    tmp_path, demo_assets, tokenizer
):
    root = tmp_path / "ds"
    root.mkdir()
    (root / "README.md").write_text("# data coming soon\n")
    (root / "._train.jsonl").write_text(jsonl(ROWS))
    with pytest.raises(DataError) as err:
        encode_rows(cfg(root, demo_assets["base_model"]), tokenizer)
    msg = str(err.value)
    assert not err.value.retryable, "the same files are there on a retry"
    assert f"{root}: folder holds no data file" in msg
    assert "._train.jsonl (hidden)" in msg and "README.md (not a data file (.md))" in msg


def test_a_hidden_file_named_directly_is_read(tmp_path, demo_assets, tokenizer):
    path = tmp_path / ".train.jsonl"  # the user named it: not a file found by listing
    path.write_text(jsonl(ROWS))
    _, stats = encode_rows(cfg(path, demo_assets["base_model"]), tokenizer)
    assert stats["files"] == {"read": [{"file": ".train.jsonl", "rows": 20}], "skipped": []}


def test_files_max_rows_stops_before_count_what_was_read(tmp_path, demo_assets, tokenizer):
    root = dataset_folder(tmp_path / "ds")
    _, stats = encode_rows(cfg(root, demo_assets["base_model"], max_rows=5), tokenizer)
    assert stats["rows_read"] == 5
    assert stats["files"]["read"] == [
        {"file": "data/more.csv", "rows": 5},
        {"file": "data/train.jsonl", "rows": None},  # never reached
    ]
