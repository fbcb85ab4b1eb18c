"""Turn a raw record of any supported schema into chat ``messages``.

Supported schemas (detected per row from its keys):

* chat: ``{"messages": [{"role": "user", "content": ...}, ..., {"role": "assistant", ...}]}``,
  where ``content`` is text or a list of text parts (``[{"type": "text", "text": ...}]``);
* Alpaca: ``{"instruction": ..., "input": ... (optional), "output": ...}``
* prompt/completion: ``{"prompt": ..., "completion": ...}``

Errors name the file, row and field, never the row's text: a message may only echo a word
from the fixed vocabularies below, so nothing of a user's data reaches logs or MLflow tags.
"""

from __future__ import annotations

import difflib

from qlora_kfp.errors import DataError

ROLES = ("system", "user", "assistant")
SCHEMAS = {
    "messages": ("messages",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
}
_KEYS = sorted({k for keys in SCHEMAS.values() for k in keys} | {"input"})
# Names other dataset formats use; safe to echo because they are ours, not the user's text.
_OTHER_KEYS = {"conversations", "question", "answer", "response", "text", "query", "context"}
_OTHER_ROLES = {"human", "gpt", "bot", "model", "ai", "chatbot", "tool", "function", "developer"}
_PART_TYPES = {"image", "image_url", "input_image", "audio", "input_audio", "video", "file"}


def _known(word: object, vocabulary: set[str] | list[str]) -> str:
    """``word`` quoted when it is (nearly) a word of ``vocabulary``, else ""."""
    if isinstance(word, str) and len(word) <= 40:
        w = word.strip().lower()
        if w in vocabulary or difflib.get_close_matches(w, list(vocabulary), n=1, cutoff=0.8):
            return repr(word)
    return ""


def _given(value: object) -> bool:
    """A field holds something: Parquet fills another schema's columns with nulls and CSV
    with empty cells, so a table may mix schemas row by row."""
    if isinstance(value, str):
        return bool(value.strip())
    return value is not None and value != []


def _schema_name(name: str) -> str:
    return "+".join(f"'{k}'" for k in SCHEMAS[name])


def detect_schema(rec: dict, file: str, row: int) -> str:
    given = [name for name, keys in SCHEMAS.items() if all(_given(rec.get(k)) for k in keys)]
    if len(given) > 1:
        # Training on one and dropping the other would be a guess: a merge of two exports
        # gone wrong, or a column meant for something else.
        a, b = (_schema_name(n) for n in given[:2])
        raise DataError(
            f"both {a} and {b} are set; which one to train on is unclear: keep one of them",
            source=file,
            row=row,
        )
    if given:
        return given[0]
    for name, keys in SCHEMAS.items():
        if all(k in rec for k in keys):
            return name
    # Name only keys that are (nearly) ours: in a CSV without a header the "keys" are the
    # first row's cells, which must not be echoed.
    named = [q for q in (_known(k, _KEYS) or _known(k, _OTHER_KEYS) for k in rec) if q]
    others = len(rec) - len(named)
    seen = ", ".join(named + ([f"{others} other{'s' if others > 1 else ''}"] if others else []))
    hint = " (a CSV file's first line must be the header)" if file.lower().endswith(".csv") else ""
    raise DataError(
        f"no known schema; keys: {seen or 'none'}. Expected 'messages', "
        f"'instruction'+'output' (Alpaca) or 'prompt'+'completion'{hint}",
        source=file,
        row=row,
    )


def _check_text(value: str, file: str, row: int, field: str) -> str:
    if not value.strip():
        what = "missing or empty" if not value else "only whitespace"
        # An error, not a counted drop, as for an empty field: a blank answer is almost always
        # a broken export (an empty cell, a lost column), and trained on, it teaches the model
        # to answer nothing; a prompt of whitespace has nothing to learn from.
        raise DataError(what, source=file, row=row, field=field)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # JSON allows lone surrogate escapes like "\ud800"
        raise DataError(
            f"not valid Unicode (an unpaired surrogate at character {exc.start + 1})",
            source=file,
            row=row,
            field=field,
        ) from None
    return value


def _text(rec: dict, key: str, file: str, row: int, required: bool = True) -> str:
    value = rec.get(key)
    if not required and (value is None or (isinstance(value, str) and not value.strip())):
        return ""  # an optional field (Alpaca's input) left empty
    if value is None:
        raise DataError("missing or empty", source=file, row=row, field=key)
    if not isinstance(value, str):
        raise DataError(
            f"expected text, got {type(value).__name__}", source=file, row=row, field=key
        )
    return _check_text(value, file, row, key)


def _content(value: object, file: str, row: int, field: str) -> str:
    """A message's content: text, or a list of text parts joined with newlines.

    Newlines as vLLM's OpenAI server joins the text parts of a message for a text-only chat
    template (vllm/entrypoints/chat_utils.py): the model is trained as it will be served.
    """
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            where = f"{field}[{j}]"
            if not isinstance(part, dict):
                raise DataError(
                    "expected a part object {'type': 'text', 'text': ...}",
                    source=file,
                    row=row,
                    field=where,
                )
            kind = part.get("type")
            if kind != "text":
                got = _known(kind, _PART_TYPES) or "not 'text'"
                raise DataError(
                    f"only text parts can be trained on; this part's type is {got}",
                    source=file,
                    row=row,
                    field=f"{where}.type",
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise DataError(
                    f"expected text, got {type(text).__name__}",
                    source=file,
                    row=row,
                    field=f"{where}.text",
                )
            texts.append(text)
        value = "\n".join(texts)
    if not isinstance(value, str):
        got = "nothing" if value is None else type(value).__name__
        raise DataError(
            f"expected text or a list of text parts, got {got}", source=file, row=row, field=field
        )
    return _check_text(value, file, row, field)


def to_messages(rec: dict, file: str, row: int) -> list[dict[str, str]]:
    """Normalize one record to a list of ``{"role", "content"}`` ending with the assistant."""
    schema = detect_schema(rec, file, row)
    if schema == "alpaca":
        instruction = _text(rec, "instruction", file, row)
        extra = _text(rec, "input", file, row, required=False)
        user = f"{instruction}\n\n{extra}" if extra else instruction
        return [
            {"role": "user", "content": user},
            {"role": "assistant", "content": _text(rec, "output", file, row)},
        ]
    if schema == "prompt_completion":
        return [
            {"role": "user", "content": _text(rec, "prompt", file, row)},
            {"role": "assistant", "content": _text(rec, "completion", file, row)},
        ]
    msgs = rec["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise DataError(
            "expected a non-empty list of messages", source=file, row=row, field="messages"
        )
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise DataError(
                "expected an object with role and content", source=file, row=row, field=where
            )
        role = m.get("role")
        if role not in ROLES:
            got = _known(role, set(ROLES) | _OTHER_ROLES)
            raise DataError(
                f"role {got + ' ' if got else ''}is not one of {', '.join(ROLES)}",
                source=file,
                row=row,
                field=f"{where}.role",
            )
        out.append(
            {"role": role, "content": _content(m.get("content"), file, row, f"{where}.content")}
        )
    if out[-1]["role"] != "assistant":
        raise DataError(
            "the last message must be the assistant's answer to train on",
            source=file,
            row=row,
            field=f"messages[{len(out) - 1}].role",
        )
    if not any(m["role"] == "user" for m in out):
        raise DataError(
            "no user turn: a conversation needs a 'user' message before the answer",
            source=file,
            row=row,
            field="messages",
        )
    return out
