"""Train/eval split by prompt: every row of one prompt goes to the same side.

Deduplication drops only exact duplicates, so a dataset with one question asked twice (other
capitals, a trailing space, two answers) would otherwise put it on both sides of the split, and
the eval loss would measure recall of a training prompt. Rows are grouped by their prompt
normalized for Unicode form, case and whitespace, and further ignoring punctuation and symbols
(a near-duplicate such as "What is hot?" / "what is hot" joins the same group); whole groups
are drawn, seeded, for the eval split. Only the prompt counts: the system message is left out
(one question under two system prompts is still the same question) and so is the answer.
"""

from __future__ import annotations

import random
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass

from qlora_kfp.errors import DataError

_SPACE = re.compile(r"\s+")
_NOT_WORD = re.compile(r"[\W_]+")  # anything but letters and digits, in any script


def prompt_keys(messages: list[dict]) -> tuple[str, str]:
    """``(strict, loose)`` keys of a conversation's prompt (every turn before the answer but
    system turns): strict ignores Unicode form, case and whitespace; loose also punctuation
    and symbols (a turn of nothing but symbols keeps its strict text, so "?" and "!" differ)."""
    strict, loose = [], []
    for m in messages[:-1]:
        if m["role"] == "system":
            continue
        text = _SPACE.sub(" ", unicodedata.normalize("NFKC", m["content"]).casefold()).strip()
        strict.append(f"{m['role']}\x1f{text}")
        loose.append(f"{m['role']}\x1f{_NOT_WORD.sub('', text) or text}")
    return "\x1e".join(strict), "\x1e".join(loose)


@dataclass
class Split:
    """Row indices of each side, and counts for stats.json."""

    train: list[int]
    eval: list[int]
    stats: dict[str, int]


def split_by_prompt(
    keys: list[tuple[str, str]], eval_fraction: float, min_eval_rows: int, seed: int, source: str
) -> Split:
    """Seeded split of rows (given by their :func:`prompt_keys`) into train and eval.

    The groups are shuffled with ``seed``; in that order each group goes to eval while it fits
    in ``eval_fraction`` of the rows (at least 1 row), so eval never holds more than that share
    and holds less only when no remaining group fits. When every prompt is unique this is
    exactly a seeded shuffle of the rows, the first ``eval_fraction`` held out.

    Raises:
        DataError: when the eval split would hold fewer than ``min_eval_rows`` rows (groups too
            large for ``eval_fraction``) or the train split none; the message counts the groups.
    """
    groups: dict[str, list[int]] = {}
    for i, (_, loose) in enumerate(keys):
        groups.setdefault(loose, []).append(i)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    n, target = len(keys), max(1, round(len(keys) * eval_fraction))
    held, size = set(), 0
    for at, group in enumerate(order):
        if size + len(group) <= target:
            held.add(at)
            size += len(group)
            if size == target:
                break
    if size < min_eval_rows or n - size < 1:
        raise DataError(
            f"{n} usable rows in {len(order)} prompt group{'s' if len(order) > 1 else ''} give "
            f"{size} eval and {n - size} train rows (all rows of one prompt stay on one side, "
            f"and eval gets at most eval_fraction of the rows, {target}; the smallest group has "
            f"{min(map(len, order))}); need at least {min_eval_rows} eval and 1 train row. Add "
            "data with other prompts or raise eval_fraction",
            source=source,
        )
    strict = Counter(s for s, _ in keys)
    variants = {loose: len({keys[i][0] for i in rows}) for loose, rows in groups.items()}
    stats = {
        "prompt_groups": len(groups),
        "eval_prompt_groups": len(held),
        "shared_prompt_rows": sum(c for c in strict.values() if c > 1),
        "near_duplicate_prompt_rows": sum(len(groups[k]) for k, v in variants.items() if v > 1),
    }
    train = [i for at, g in enumerate(order) if at not in held for i in g]
    return Split(train, [i for at, g in enumerate(order) if at in held for i in g], stats)
