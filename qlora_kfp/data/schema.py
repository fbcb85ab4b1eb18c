"""Turn a raw record of any supported schema into chat ``messages``.

Supported schemas (detected per row from its keys):

* chat: ``{"messages": [{"role": "user", "content": ...}, ..., {"role": "assistant", ...}]}``
* Alpaca: ``{"instruction": ..., "input": ... (optional), "output": ...}``
* prompt/completion: ``{"prompt": ..., "completion": ...}``
"""

from __future__ import annotations

from qlora_kfp.errors import DataError

ROLES = ("system", "user", "assistant")
SCHEMAS = {
    "messages": ("messages",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
}


def detect_schema(rec: dict, file: str, row: int) -> str:
    for name, keys in SCHEMAS.items():
        if all(k in rec for k in keys):
            return name
    raise DataError(
        f"no known schema; keys are {sorted(rec)}. Expected 'messages', "
        "'instruction'+'output' (Alpaca) or 'prompt'+'completion'",
        source=file,
        row=row,
    )


def _text(rec: dict, key: str, file: str, row: int, required: bool = True) -> str:
    value = rec.get(key)
    if value is None or value == "":
        if required:
            raise DataError("missing or empty", source=file, row=row, field=key)
        return ""
    if not isinstance(value, str):
        raise DataError(
            f"expected text, got {type(value).__name__}", source=file, row=row, field=key
        )
    return value


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
            raise DataError(
                f"role {role!r} is not one of {', '.join(ROLES)}",
                source=file,
                row=row,
                field=f"{where}.role",
            )
        content = m.get("content")
        if not isinstance(content, str) or not content:
            raise DataError(
                "missing, empty or not text", source=file, row=row, field=f"{where}.content"
            )
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "assistant":
        raise DataError(
            "the last message must be the assistant's answer to train on",
            source=file,
            row=row,
            field=f"messages[{len(out) - 1}].role",
        )
    return out
