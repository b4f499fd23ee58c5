"""Incremental detokenization: text deltas that never split a character made of several tokens."""

from __future__ import annotations

from typing import Any

_PROMPT_CONTEXT_TOKENS = 6  # prompt tokens decoded with the output so word boundaries (leading spaces) come out right
_REPLACEMENT = "\ufffd"  # what a tokenizer prints for an incomplete UTF-8 sequence


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Each call decodes a short window [prefix_offset:] and emits only the text past [prefix_offset:read_offset];
    a window whose text ends in U+FFFD (a multi-byte character not finished yet: Chinese, emoji) is held back
    until the next token completes it, so streamed deltas concatenate to exactly the whole text.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self.token_ids: list[int] = context
        self.prefix_offset = 0
        self.read_offset = len(context)
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def add(self, new_token_ids: list[int]) -> str:
        """Append tokens; return the new text that is certain (may be empty)."""
        self.token_ids.extend(new_token_ids)
        prefix_text = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        full_text = self._decode(self.token_ids[self.prefix_offset:])
        if len(full_text) > len(prefix_text) and not full_text.endswith(_REPLACEMENT):
            delta = full_text[len(prefix_text):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.token_ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """At the end of the request: emit whatever is still held back, even an incomplete character."""
        prefix_text = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        full_text = self._decode(self.token_ids[self.prefix_offset:])
        delta = full_text[len(prefix_text):] if len(full_text) > len(prefix_text) else ""
        self.prefix_offset = self.read_offset = len(self.token_ids)
        self.text += delta
        return delta
