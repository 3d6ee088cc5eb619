"""Incremental detokenization that never emits half a character.

Byte-level tokenizers split multi-byte UTF-8 characters across tokens; a
window of tokens that ends mid-character decodes to U+FFFD. We decode a
short window of already-emitted tokens plus the new ones, and release text
only once it no longer ends in an incomplete character.
"""
from __future__ import annotations

from typing import Any

# Tokens of already-emitted text to decode along with new ones, so that
# tokenizers which render a token differently at a word start (leading
# spaces, "▁") produce the same text as a full decode.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool,
                 spaces_between_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        tail = prompt_token_ids[-_CONTEXT_TOKENS:]
        self.tokens: list[str] = tokenizer.convert_ids_to_tokens(
            tail, skip_special_tokens=skip_special_tokens)
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)

    def _to_text(self, tokens: list[str]) -> str:
        return self.tokenizer.convert_tokens_to_string(tokens) if tokens else ""

    def decode_token(self, token_id: int) -> str:
        """The text that token ``token_id`` completes (possibly empty)."""
        new = self.tokenizer.convert_ids_to_tokens([token_id],
                                                   skip_special_tokens=self.skip_special_tokens)
        # ids past the tokenizer's vocabulary (checkpoints pad the embedding) have no text
        self.tokens.extend(t for t in new if t is not None)
        before = self._to_text(self.tokens[self.prefix_offset:self.read_offset])
        after = self._to_text(self.tokens[self.prefix_offset:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.tokens)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """Text held back at the end because it looked like an incomplete
        character; released when no further token can complete it."""
        before = self._to_text(self.tokens[self.prefix_offset:self.read_offset])
        after = self._to_text(self.tokens[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.tokens)
        return after[len(before):]


def token_text(tokenizer: Any, token_id: int) -> str:
    """Text of a single token, for logprob entries."""
    return tokenizer.decode([token_id]) if token_id < len(tokenizer) else ""
