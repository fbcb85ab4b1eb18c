"""Chat templates and prompt/completion tokenization with label masking."""

from __future__ import annotations

from dataclasses import dataclass, field

from qlora_kfp.data.specials import SpecialText

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ALPACA = (
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'assistant' %}### Response:\n{{ m['content'] }}{{ eos_token }}\n\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}### Response:\n{% endif %}"
)
NAMED = {"chatml": CHATML, "alpaca": ALPACA}
# Strings that end an assistant turn in common templates (ChatML, Llama 3, Gemma, Mistral, GPT
# style). Where the tokenizer has one as a token, that token alone ends an answer: the same
# string in a row's text was trained on as plain text (data.specials), and is part of the
# answer. A template marker the tokenizer lacks can only be written as text; the model learns
# it before EOS, and it is dropped from the answer's end (answer_text).
END_MARKERS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "</s>", "<|endoftext|>", "<|end|>")


def end_of_turn_ids(tokenizer) -> list[int]:
    """The token ids that end a generated answer: EOS and each end-of-turn marker that is one
    token of this tokenizer."""
    added = tokenizer.get_added_vocab()
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return list(dict.fromkeys(ids + [added[m] for m in END_MARKERS if m in added]))


def answer_text(tokenizer, ids: list[int]) -> str:
    """A generated answer's text: its ids up to the first end-of-turn token, without special
    tokens, and without the end marker the chat template writes as text (one the tokenizer
    has no token for) at its end. Marker text inside the answer stays: it is the answer's."""
    stop = set(end_of_turn_ids(tokenizer))
    end = next((i for i, t in enumerate(ids) if t in stop), len(ids))
    text = tokenizer.decode(ids[:end], skip_special_tokens=True).strip()
    added, template = tokenizer.get_added_vocab(), tokenizer.chat_template or ""
    as_text = [m for m in END_MARKERS if m not in added and m in template]
    while marker := next((m for m in as_text if text.endswith(m)), None):
        text = text[: -len(marker)].rstrip()
    return text


IGNORE = -100


def apply_template(tokenizer, name: str) -> str:
    """Set ``tokenizer.chat_template`` from ``name``; return the name actually used."""
    if name in ("auto", "tokenizer") and getattr(tokenizer, "chat_template", None):
        return "tokenizer"
    if name == "tokenizer":
        from qlora_kfp.errors import ConfigError

        raise ConfigError(
            "chat_template='tokenizer' but the tokenizer has none; use chatml, alpaca or auto"
        )
    chosen = "chatml" if name == "auto" else name
    tokenizer.chat_template = NAMED[chosen]
    return chosen


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of a rendered prompt, with BOS prepended when the template did not add it."""
    return _with_bos(tokenizer, prompt, tokenizer(prompt, add_special_tokens=False)["input_ids"])


def _with_bos(tokenizer, prompt: str, ids: list[int]) -> list[int]:
    if tokenizer.bos_token_id is not None and not prompt.startswith(tokenizer.bos_token or "\0"):
        ids = [tokenizer.bos_token_id] + ids
    return ids


def template_source(tokenizer) -> str:
    """Where ``tokenizer``'s chat template comes from, for a message: the named one set by
    ``chat_template``, or the model's file that holds it."""
    template = getattr(tokenizer, "chat_template", None)
    for name, text in NAMED.items():
        if template == text:
            return f"chat_template={name}"
    from pathlib import Path

    folder = Path(getattr(tokenizer, "name_or_path", "") or ".")
    for name in ("chat_template.jinja", "chat_template.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            return str(folder / name)
    return f"the tokenizer of {folder}"


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """``apply_chat_template`` as text; a template that refuses the conversation (its
    ``raise_exception``, as Gemma's does for a system message) is one :class:`DataError`."""
    from jinja2.exceptions import TemplateError

    try:
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False
        )
    except TemplateError as exc:
        from qlora_kfp.errors import DataError

        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        system = any(m.get("role") == "system" for m in messages)
        todo = (
            "drop the system message from the data, or set chat_template to chatml or alpaca"
            if system and "system" in reason.lower()
            else "change the data to what the template accepts, or set chat_template to "
            "chatml or alpaca"
        )
        raise DataError(
            f"the chat template of {template_source(tokenizer)} refuses this conversation "
            f"({reason}); {todo}"
        ) from None


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    prompt: str
    reference: str
    truncated: bool = False
    prompt_ids: list[int] = field(default_factory=list)  # what generation starts from
    prompt_key: tuple[str, str] = ("", "")  # the split's group keys (data.splitting)


def encode(
    tokenizer,
    messages: list[dict],
    max_len: int,
    train_on_prompt: bool,
    truncate: bool,
    special: SpecialText | None = None,
) -> Encoded | None:
    """Render and tokenize one conversation; mask prompt tokens in the labels.

    The prompt (everything before the last assistant turn, with the generation prompt) and the
    completion are tokenized separately and concatenated, so the label boundary is exact even
    where BPE would merge across it. EOS is appended to the completion when the template does
    not end with it, so the model learns to stop. Special-token strings inside the messages'
    text are tokenized as plain text (``special``, built from ``tokenizer`` when not given),
    so no row can forge a turn or move the label boundary. Returns ``None`` for a row over
    ``max_len`` when not truncating.
    """
    special = special or SpecialText(tokenizer)
    safe = special.escape(messages)
    prompt = _render(tokenizer, safe[:-1], add_generation_prompt=True)
    full = _render(tokenizer, safe)
    if not full.startswith(prompt):
        from qlora_kfp.errors import ConfigError

        raise ConfigError(
            "the chat template renders the prompt differently inside the full "
            "conversation; use chat_template=chatml or alpaca"
        )
    completion = full[len(prompt) :]
    p_ids = _with_bos(tokenizer, prompt, special.tokenize(prompt))
    c_ids = special.tokenize(completion)
    eos = tokenizer.eos_token_id
    if eos is not None and eos not in c_ids:
        c_ids = c_ids + [eos]
    ids = p_ids + c_ids
    labels = list(ids) if train_on_prompt else [IGNORE] * len(p_ids) + c_ids
    truncated = False
    if len(ids) > max_len:
        if not truncate:
            return None
        ids, labels, truncated = ids[:max_len], labels[:max_len], True
    return Encoded(ids, labels, special.unescape(prompt), messages[-1]["content"], truncated, p_ids)
