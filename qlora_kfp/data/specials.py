"""Text a user wrote stays text: special-token strings in a row never become special tokens.

Tokenized as one string, a row whose answer holds ``<|im_end|>\\n<|im_start|>assistant\\n...``
(or the tokenizer's EOS/BOS, or Llama 3's ``<|start_header_id|>``) would forge turns: the model
would see a conversation the data never had, and the label mask would train on tokens the
template never marked as the answer. transformers' ``apply_chat_template(...,
sanitize_control_tokens=True)`` solves this by wrapping the control tokens in the messages'
strings in private-use markers before rendering and encoding marked tokens as plain text. It
only does so while tokenizing the whole conversation at once; prepare-dataset tokenizes prompt
and completion apart (for an exact label boundary), so this module applies the same two steps
to each part. Rows without control tokens in their text are tokenized exactly as before.
"""

from __future__ import annotations

from qlora_kfp.errors import DataError


class SpecialText:
    """Mark control tokens in message contents; tokenize rendered text with them as text.

    The control tokens are transformers' own choice for ``sanitize_control_tokens``: every
    special token, plus the added tokens the chat template writes (a template marker added as a
    non-special token forges turns as well), or ``tokenizer.chat_control_tokens`` when set.

    Args:
        tokenizer: A transformers tokenizer with its chat template already set.
    """

    def __init__(self, tokenizer):
        # transformers 5.x (pinned in constraints.txt); the helpers apply_chat_template uses
        # for sanitize_control_tokens (transformers/utils/chat_template_utils.py).
        from transformers.utils import chat_template_utils as ctu

        self.tokenizer = tokenizer
        tokens = tokenizer._get_control_tokens(tokenizer.get_chat_template())
        self._pattern, _ = ctu._get_control_token_patterns(tuple(tokens))
        self._markers = (ctu._CONTROL_TOKEN_START, ctu._CONTROL_TOKEN_END)
        self._mark, self._encode = ctu.mark_control_tokens, ctu.encode_marked_chat

    def escape(self, messages: list[dict]) -> list[dict]:
        """Messages whose contents have every control token wrapped in markers (and any
        marker character the data held removed, so none can be faked)."""
        return [{**m, "content": self._mark(m["content"], self._pattern)} for m in messages]

    def unescape(self, text: str) -> str:
        """Rendered ``text`` without the markers: the text as written."""
        start, end = self._markers
        return text.replace(start, "").replace(end, "")

    def tokenize(self, text: str) -> list[int]:
        """Token ids of rendered ``text``: the template's control tokens as tokens, the marked
        ones (from the data) as plain text.

        Raises:
            DataError: a control token this tokenizer also produces from plain text, so it
                cannot be kept apart (the caller adds file and row).
        """
        try:
            return self._encode(self.tokenizer, text)
        except ValueError as exc:
            if "Can't sanitize" not in str(exc):
                raise
            raise DataError(
                "holds a special token as text that this tokenizer cannot encode as plain text; "
                "remove it"
            ) from None
