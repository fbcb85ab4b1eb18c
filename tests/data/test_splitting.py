"""Train/eval split by prompt: no eval prompt is seen in training, in any spelling."""

from __future__ import annotations

import dataclasses
import random
import re
import unicodedata

import pyarrow.parquet as pq
import pytest

from qlora_kfp.configs import PrepareConfig
from qlora_kfp.errors import DataError
from qlora_kfp.stages.prepare import encode_rows, run_prepare, split


def cfg(path, base, **kw):
    return PrepareConfig(data_source=str(path), base_model=base, max_seq_length=64, **kw)


def same_prompt(text: str) -> str:
    """What a person reads as the same question: no case, spacing or punctuation."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return re.sub(r"[\W_]+", "", text)


def spellings(i: int) -> list[dict]:
    """One question in four spellings, each with its own answer (not exact duplicates)."""
    q = f"What is the opposite of w{i}?"
    return [
        {"prompt": q, "completion": f"a{i}"},
        {"prompt": q.upper(), "completion": f"A{i}"},
        {"prompt": "  " + q.replace(" ", "   ") + "\n", "completion": f"a{i}, surely"},
        {"prompt": q.rstrip("?") + " !", "completion": f"it is a{i}"},  # punctuation only
    ]


def test_no_eval_prompt_is_seen_in_training(write_rows, demo_assets, tmp_path):
    rows = [r for i in range(15) for r in spellings(i)]
    random.Random(1).shuffle(rows)
    path = write_rows(rows)
    res = run_prepare(cfg(path, demo_assets["base_model"], eval_fraction=0.2), str(tmp_path / "o"))
    prompts = {
        side: {
            same_prompt(p)
            for p in pq.read_table(tmp_path / "o" / f"{side}.parquet")["prompt"].to_pylist()
        }
        for side in ("train", "eval")
    }
    assert prompts["eval"] and not prompts["train"] & prompts["eval"]
    assert (res.stats["train_rows"], res.stats["eval_rows"]) == (48, 12)  # 3 whole groups of 4


def test_the_split_counts_duplicates_shared_and_near_duplicate_prompts(
    write_rows, demo_assets, tmp_path
):
    rows = (
        spellings(0)  # 3 share a prompt up to case/space, 1 more only up to punctuation
        + [{"prompt": "Give the antonym of big.", "completion": "small"}] * 2  # exact duplicate
        + [{"prompt": f"unique {i}", "completion": "x"} for i in range(8)]
    )
    res = run_prepare(cfg(write_rows(rows), demo_assets["base_model"]), str(tmp_path / "o"))
    s = res.stats
    assert s["dropped_duplicate"] == 1 and s["rows_kept"] == 13
    assert s["prompt_groups"] == 10  # spellings(0) is one group, big is one, 8 unique
    assert s["shared_prompt_rows"] == 3
    assert s["near_duplicate_prompt_rows"] == 4  # the whole group holding the "!" spelling
    assert s["eval_prompt_groups"] >= 1


def test_one_question_under_two_system_prompts_stays_on_one_side(
    write_rows, demo_assets, tokenizer
):
    def ask(system, i, answer):
        return {
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": f"Opposite of w{i}?"},
                {"role": "assistant", "content": answer},
            ]
        }

    rows = [ask(s, i, f"{s[:2]}{i}") for i in range(10) for s in ("Be brief.", "Answer in full.")]
    c = cfg(write_rows(rows), demo_assets["base_model"], eval_fraction=0.3)
    enc, _ = encode_rows(c, tokenizer)
    train, evals = split(enc, c)[:2]
    question = lambda r: r.prompt.split("user\n")[1]  # noqa: E731
    assert len(evals) == 6
    assert not {question(r) for r in train} & {question(r) for r in evals}


def test_unique_prompts_split_as_a_seeded_shuffle_of_the_rows(write_rows, demo_assets, tokenizer):
    rows = [{"prompt": f"Opposite of: w{i}", "completion": f"a{i}"} for i in range(40)]
    for seed in (0, 7):
        c = cfg(write_rows(rows), demo_assets["base_model"], eval_fraction=0.25, seed=seed)
        enc, _ = encode_rows(c, tokenizer)
        train, evals = split(enc, c)[:2]
        order = list(range(40))
        random.Random(seed).shuffle(order)  # what the split did before prompts were grouped
        assert [r.reference for r in evals] == [f"a{i}" for i in order[:10]]
        assert [r.reference for r in train] == [f"a{i}" for i in order[10:]]


def test_large_groups_keep_eval_within_eval_fraction(write_rows, demo_assets, tokenizer):
    """Eval never takes more than eval_fraction: a group that does not fit stays in train."""
    rows = [r for i in range(3) for r in spellings(i)]  # 3 groups of 4
    rows += [{"prompt": f"unique {i}", "completion": "x"} for i in range(8)]  # 8 groups of 1
    c = cfg(write_rows(rows), demo_assets["base_model"], eval_fraction=0.15)  # 3 of 20 rows
    enc, _ = encode_rows(c, tokenizer)
    for seed in range(5):
        train, evals = split(enc, dataclasses.replace(c, seed=seed))[:2]
        assert len(evals) == 3 and len(train) == 17
        assert not {same_prompt(r.prompt) for r in train} & {same_prompt(r.prompt) for r in evals}


@pytest.mark.parametrize(
    "rows,fraction,fragment",
    [
        (
            spellings(0) + spellings(1),
            0.1,
            "8 usable rows in 2 prompt groups give 0 eval and 8 train",
        ),
        (spellings(0), 0.5, "4 usable rows in 1 prompt group give 0 eval and 4 train"),
    ],
    ids=["groups-larger-than-eval-share", "one-prompt-only"],
)
def test_groups_too_large_for_the_eval_share_fail_and_say_why(
    rows, fraction, fragment, write_rows, demo_assets, tmp_path
):
    with pytest.raises(DataError) as err:
        run_prepare(
            cfg(write_rows(rows), demo_assets["base_model"], eval_fraction=fraction),
            str(tmp_path / "o"),
        )
    msg = str(err.value)
    assert fragment in msg and "all rows of one prompt stay on one side" in msg
    assert "raise eval_fraction" in msg and "the smallest group has 4" in msg


def test_the_demo_eval_holds_unseen_prompts_of_word_pairs_seen_in_training(prepared):
    """What the README says of the demo's figures: held-out phrasings of trained pairs."""
    from qlora_kfp.app.demo import PHRASINGS

    def pair(row):
        for p in PHRASINGS:
            m = re.search(re.escape(p).replace(r"\{w\}", r"(\w+)"), row["prompt"])
            if m:
                return m.group(1), row["reference"]
        raise AssertionError("not a demo prompt")

    train, evals = (
        pq.read_table(f"{prepared.path}/{s}.parquet", columns=["prompt", "reference"]).to_pylist()
        for s in ("train", "eval")
    )
    assert len(evals) == 36 and not {r["prompt"] for r in train} & {r["prompt"] for r in evals}
    assert {pair(r) for r in evals} <= {pair(r) for r in train}
