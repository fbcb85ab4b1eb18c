"""prepare-dataset: formats, schemas, masking, dedupe, overlong rows, split, bad input."""

from __future__ import annotations

import json

import pytest

from qlora_kfp.configs import PrepareConfig
from qlora_kfp.data.templates import IGNORE
from qlora_kfp.errors import DataError, SourceError
from qlora_kfp.stages.prepare import encode_rows, run_prepare, split
from qlora_kfp.storage.artifacts import load_split
from qlora_kfp.storage.manifest import verify

ALPACA = [{"instruction": f"Opposite of: w{i}", "input": "", "output": f"a{i}"} for i in range(20)]
PROMPT_COMPLETION = [{"prompt": f"Opposite of: w{i}", "completion": f"a{i}"} for i in range(20)]
CHAT = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"Opposite of: w{i}"},
            {"role": "assistant", "content": f"a{i}"},
        ]
    }
    for i in range(20)
]


def cfg(path, base, **kw):
    return PrepareConfig(data_source=path, base_model=base, max_seq_length=64, **kw)


# Every schema in every format, but chat in CSV: messages are nested, CSV holds flat schemas.
FORMAT_CASES = [
    pytest.param(rows, fmt, id=f"{name}-{fmt}")
    for name, rows in (("alpaca", ALPACA), ("prompt-completion", PROMPT_COMPLETION), ("chat", CHAT))
    for fmt in ("jsonl", "json", "csv", "parquet")
    if not (name == "chat" and fmt == "csv")
]


@pytest.mark.parametrize("rows,fmt", FORMAT_CASES)
def test_every_format_and_schema_gives_the_same_kind_of_rows(
    rows, fmt, write_rows, demo_assets, tokenizer
):
    path = write_rows(rows, fmt)
    encoded, stats = encode_rows(cfg(path, demo_assets["base_model"]), tokenizer)
    assert stats["rows_read"] == 20 and len(encoded) == 20
    assert {e.reference for e in encoded} == {f"a{i}" for i in range(20)}


def test_prompt_tokens_are_masked_and_eos_is_learned(write_rows, demo_assets, tokenizer):
    path = write_rows(ALPACA[:1])
    (enc,), _ = encode_rows(cfg(path, demo_assets["base_model"]), tokenizer)
    first = next(i for i, x in enumerate(enc.labels) if x != IGNORE)
    assert all(x == IGNORE for x in enc.labels[:first])
    assert enc.labels[first:] == enc.input_ids[first:]
    assert tokenizer.decode(enc.input_ids[:first]) == tokenizer.bos_token + enc.prompt
    assert tokenizer.eos_token_id in enc.labels[first:], "the model must learn to stop"


def test_train_on_prompt_keeps_every_label(write_rows, demo_assets, tokenizer):
    path = write_rows(ALPACA[:1])
    (enc,), _ = encode_rows(cfg(path, demo_assets["base_model"], train_on_prompt=True), tokenizer)
    assert enc.labels == enc.input_ids


def test_duplicates_dropped_and_counted(write_rows, demo_assets, tokenizer):
    path = write_rows(ALPACA[:5] + ALPACA[:3])
    rows, stats = encode_rows(cfg(path, demo_assets["base_model"]), tokenizer)
    assert (len(rows), stats["dropped_duplicate"]) == (5, 3)
    rows, stats = encode_rows(cfg(path, demo_assets["base_model"], dedupe=False), tokenizer)
    assert (len(rows), stats["dropped_duplicate"]) == (8, 0)


@pytest.mark.parametrize(
    "overlong,kept,counter", [("drop", 20, "dropped_too_long"), ("truncate", 21, "truncated")]
)
def test_overlong_rows_dropped_or_truncated(
    overlong, kept, counter, write_rows, demo_assets, tokenizer
):
    long_row = {"instruction": "Opposite of: w", "output": " ".join(["word"] * 200)}
    path = write_rows(ALPACA + [long_row])
    rows, stats = encode_rows(cfg(path, demo_assets["base_model"], overlong=overlong), tokenizer)
    assert len(rows) == kept and stats[counter] == 1
    assert max(len(r.input_ids) for r in rows) <= 64


def test_split_is_seeded_and_disjoint(write_rows, demo_assets, tokenizer):
    c = cfg(write_rows(ALPACA), demo_assets["base_model"], eval_fraction=0.25)
    rows, _ = encode_rows(c, tokenizer)
    (tr1, ev1, _), (_tr2, ev2, _) = split(rows, c), split(rows, c)
    assert [r.reference for r in ev1] == [r.reference for r in ev2]
    assert len(ev1) == 5 and not {r.reference for r in tr1} & {r.reference for r in ev1}


def test_run_prepare_writes_a_verified_artifact(prepared):
    manifest = verify(prepared.path, "dataset")
    assert {"train.parquet", "eval.parquet", "stats.json"} <= set(manifest["files"])
    train, evals = load_split(prepared.path, "train"), load_split(prepared.path, "eval")
    assert (len(train), len(evals)) == (prepared.stats["train_rows"], prepared.stats["eval_rows"])
    assert (
        prepared.stats["tokens_p50"] <= prepared.stats["tokens_p90"] <= prepared.stats["tokens_max"]
    )
    info = json.loads((__import__("pathlib").Path(prepared.path) / "stats.json").read_text())
    assert info["chat_template_used"] == "tokenizer"


BAD_INPUT = [
    # (case, file content, format, expected message fragments)
    (
        "malformed-jsonl-line",
        '{"prompt": "a", "completion": "b"}\n{"prompt": "a",\n',
        "jsonl",
        ["data.jsonl, row 2", "malformed JSON"],
    ),
    ("missing-field", '{"prompt": "a"}\n', "jsonl", ["row 1", "no known schema"]),
    (
        "mistyped-field",
        '{"prompt": "a", "completion": 3}\n',
        "jsonl",
        ["row 1", "field 'completion'", "expected text, got int"],
    ),
    (
        "empty-completion",
        '{"instruction": "a", "output": ""}\n',
        "jsonl",
        ["row 1", "field 'output'", "missing or empty"],
    ),
    (
        "bad-role",
        '{"messages": [{"role": "bot", "content": "x"}]}\n',
        "jsonl",
        ["field 'messages[0].role'", "'bot'"],
    ),
    (
        "last-turn-not-assistant",
        '{"messages": [{"role": "user", "content": "x"}]}\n',
        "jsonl",
        ["messages[0].role", "last message must be the assistant"],
    ),
    ("not-an-object", "[1, 2]\n", "jsonl", ["row 1", "expected an object"]),
    ("csv-extra-cell", "prompt,completion\na,b\nc,d,e\n", "csv", ["data.csv, row 2", "cells"]),
    ("empty-file", "", "jsonl", ["has no rows"]),
    ("json-not-a-list", '{"a": 1}', "json", ["expected a list"]),
]


@pytest.mark.parametrize(
    "content,fmt,fragments", [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT]
)
def test_bad_input_names_file_row_and_field(content, fmt, fragments, tmp_path, demo_assets):
    path = tmp_path / f"data.{fmt}"
    path.write_text(content)
    out = tmp_path / "out"
    with pytest.raises(DataError) as err:
        run_prepare(cfg(str(path), demo_assets["base_model"]), str(out))
    for frag in fragments:
        assert frag in str(err.value)
    assert not out.exists(), "no artifact may be left behind"
    assert not list(tmp_path.glob(".out.partial-*"))


def test_unknown_extension_and_missing_file(tmp_path, demo_assets):
    (tmp_path / "data.xml").write_text("<a/>")
    with pytest.raises(DataError, match="unknown format '.xml'"):
        run_prepare(cfg(str(tmp_path / "data.xml"), demo_assets["base_model"]), str(tmp_path / "o"))
    with pytest.raises(SourceError, match="no such file"):
        run_prepare(
            cfg(str(tmp_path / "nope/data.jsonl"), demo_assets["base_model"]), str(tmp_path / "o")
        )


def test_every_row_too_long_says_what_to_change(write_rows, demo_assets, tmp_path):
    path = write_rows([{"prompt": "x " * 100, "completion": "y"}])
    with pytest.raises(DataError, match="no rows left after filtering.*max_seq_length"):
        run_prepare(cfg(path, demo_assets["base_model"]), str(tmp_path / "o"))


def test_eval_split_too_small(write_rows, demo_assets, tmp_path):
    path = write_rows(ALPACA[:4])
    with pytest.raises(DataError, match="need at least 3 eval"):
        run_prepare(cfg(path, demo_assets["base_model"], min_eval_rows=3), str(tmp_path / "o"))


def test_hub_dataset_id_offline_is_a_clear_error(demo_assets, tmp_path):
    with pytest.raises(SourceError, match="someone/some-dataset: cannot load from the hub"):
        run_prepare(cfg("someone/some-dataset", demo_assets["base_model"]), str(tmp_path / "o"))


def test_rendered_samples_show_what_is_learned(prepared):
    text = (__import__("pathlib").Path(prepared.path) / "rendered_samples.txt").read_text()
    first = text.split("--- row 1")[0]
    # The prompt is masked (in brackets); the answer and the EOS token are trained on.
    assert first.count("[") >= 1 and "<|im_start|>assistant\n]" in first
    assert first.rstrip().endswith("<|im_end|>\n") or "<|im_end|>" in first.split("]")[-1]
