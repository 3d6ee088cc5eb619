"""Incremental detokenization that never emits half a character.

Byte-level tokenizers split multi-byte UTF-8 characters across tokens; a
window of tokens that ends mid-character decodes to U+FFFD. We decode a
short window of already-emitted tokens plus the new ones, and release text
only once it no longer ends in an incomplete character.

This runs once per generated token of every request, so the per-token host
cost matters. For a transformers fast tokenizer whose token <-> text methods
are the library's own, we skip the Python wrappers and talk to the Rust
``tokenizers.Tokenizer`` directly, keeping ids instead of token strings: its
``decode(ids, skip_special_tokens=False)`` maps each id to its token and runs
the same decoder that ``convert_tokens_to_string`` runs, so the strings are
the ones the wrappers would give. The special-token ids that
``convert_ids_to_tokens(..., skip_special_tokens=True)`` recomputes on every
call (from the slow ``all_special_ids`` property) are computed once per
request, and the decoded text of the already-emitted part of the window is
kept until the window moves. Any other tokenizer goes through its own
``convert_ids_to_tokens`` / ``convert_tokens_to_string`` as before.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

# Tokens of already-emitted text to decode along with new ones, so that
# tokenizers which render a token differently at a word start (leading
# spaces, "▁") produce the same text as a full decode.
_CONTEXT_TOKENS = 5


def _library_classes() -> tuple[type | None, tuple[type, ...]]:
    """transformers' fast tokenizer class, and the classes (fast and slow)
    whose ``convert_ids_to_tokens(..., skip_special_tokens=True)`` drops
    exactly the ids in ``all_special_ids``."""
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None, ()
    try:
        from transformers import PreTrainedTokenizer
    except ImportError:  # pragma: no cover
        return PreTrainedTokenizerFast, (PreTrainedTokenizerFast,)
    return PreTrainedTokenizerFast, (PreTrainedTokenizerFast, PreTrainedTokenizer)


_FAST_CLS, _SKIP_BY_SPECIAL_IDS = _library_classes()


def _skips_by_special_ids(tokenizer: Any) -> bool:
    method = type(tokenizer).convert_ids_to_tokens
    return any(method is cls.convert_ids_to_tokens for cls in _SKIP_BY_SPECIAL_IDS)


def _rust_backend(tokenizer: Any) -> Any | None:
    """The Rust tokenizer behind ``tokenizer`` when decoding ids through it
    gives exactly what the transformers wrappers give, else None."""
    if _FAST_CLS is None or not isinstance(tokenizer, _FAST_CLS):
        return None
    cls = type(tokenizer)
    if (cls.convert_ids_to_tokens is not _FAST_CLS.convert_ids_to_tokens
            or cls.convert_tokens_to_string is not _FAST_CLS.convert_tokens_to_string):
        return None  # a subclass with its own token <-> text rules
    backend = getattr(tokenizer, "_tokenizer", None)
    # without a decoder the wrappers' behaviour differs between transformers
    # versions (join with spaces, or fail): leave that to them
    if backend is None or backend.decoder is None:
        return None
    return backend


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool,
                 spaces_between_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        backend = _rust_backend(tokenizer)
        self._backend = backend
        # Ids to drop when skipping special tokens, where we know that this is
        # what the tokenizer's convert_ids_to_tokens(skip_special_tokens=True)
        # does; None means ask the tokenizer itself each time.
        self._skip_ids: frozenset | None = frozenset()
        if skip_special_tokens:
            if backend is not None or _skips_by_special_ids(tokenizer):
                self._skip_ids = frozenset(tokenizer.all_special_ids)
            else:
                self._skip_ids = None
        if backend is not None:
            self._backend_decode: Callable[[list, bool], str] = backend.decode
        tail = prompt_token_ids[-_CONTEXT_TOKENS:]
        # What the window is made of: token ids on the Rust path (which may
        # include ids past the vocabulary: they decode to nothing), token
        # strings otherwise. Never holds skipped special tokens.
        self._pieces: list = []
        for token_id in tail:
            self._pieces.extend(self._to_pieces(token_id))
        self.prefix_offset = 0
        self.read_offset = len(self._pieces)
        # decoded text of _pieces[prefix_offset:read_offset], once known
        self._before: str | None = None

    def _to_pieces(self, token_id: int) -> list:
        """What ``token_id`` adds to the window: nothing for a skipped special
        token, nor, off the Rust path, for an id past the vocabulary."""
        skip_ids = self._skip_ids
        if self._backend is not None:
            token_id = int(token_id)
            return [] if token_id in skip_ids else [token_id]
        if skip_ids is None:
            new = self.tokenizer.convert_ids_to_tokens([token_id], skip_special_tokens=True)
        elif token_id in skip_ids:
            return []
        else:
            new = self.tokenizer.convert_ids_to_tokens([token_id])
        # ids past the tokenizer's vocabulary (checkpoints pad the embedding) have no text
        return [t for t in new if t is not None]

    def _to_text(self, pieces: list) -> str:
        if not pieces:
            return ""
        if self._backend is not None:
            return self._backend_decode(pieces, False)
        return self.tokenizer.convert_tokens_to_string(pieces)

    def _before_text(self) -> str:
        before = self._before
        if before is None:
            before = self._before = self._to_text(
                self._pieces[self.prefix_offset:self.read_offset])
        return before

    def decode_token(self, token_id: int) -> str:
        """The text that token ``token_id`` completes (possibly empty)."""
        pieces = self._pieces
        if self._backend is not None:  # the per-token hot path, inlined
            token_id = int(token_id)
            if token_id in self._skip_ids:
                # Nothing joins the window, so it decodes as on the previous
                # call (or, right after __init__/flush, to exactly its
                # emitted part), which released nothing new then either.
                return ""
            # An id past the vocabulary joins the window too, but the Rust
            # decode drops ids it has no token for, so it adds no text.
            pieces.append(token_id)
            prefix = self.prefix_offset
            before = self._before
            if before is None:
                read = self.read_offset
                before = self._before = (self._backend_decode(pieces[prefix:read], False)
                                         if read > prefix else "")
            after = self._backend_decode(pieces[prefix:], False)
        else:
            new = self._to_pieces(token_id)
            if not new:
                return ""  # as above
            pieces.extend(new)
            before = self._before_text()
            after = self._to_text(pieces[self.prefix_offset:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(pieces)
            self._before = None
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """Text held back at the end because it looked like an incomplete
        character; released when no further token can complete it."""
        pieces = self._pieces
        if self.read_offset == len(pieces):
            text = ""  # nothing held back: the two windows are the same
        else:
            before = self._before_text()
            text = self._to_text(pieces[self.prefix_offset:])[len(before):]
        self.prefix_offset = self.read_offset = len(pieces)
        self._before = None
        return text


def token_text(tokenizer: Any, token_id: int) -> str:
    """Text of a single token, for logprob entries."""
    return tokenizer.decode([token_id]) if token_id < len(tokenizer) else ""
