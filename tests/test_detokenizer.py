"""Incremental detokenization: the streamed pieces concatenate to the full
decode, and no piece ever holds half of a multi-byte character."""
import random

import pytest

from tests.utils import model_dir
from vllm.engine.detokenizer import IncrementalDetokenizer

TEXTS = ["café naïve résumé", "日本語のテキスト 中文", "emoji 😀🚀✨ done", "plain ascii words here",
         "mixed: Ångström → ∞ ½ and 한국어"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_dir(str(tmp_path_factory.getbasetemp()), "qwen3_moe"))


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_concatenate_to_full_decode(tokenizer, text):
    ids = tokenizer.encode(text)
    # multi-byte characters really are split across byte-level tokens here
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids) or text.isascii()
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("prompt:"), True)
    pieces = [detok.decode_token(t) for t in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + detok.flush() == tokenizer.decode(ids) == text


def test_special_tokens_skipped(tokenizer):
    ids = tokenizer.encode("hi") + [tokenizer.convert_tokens_to_ids("<|im_end|>")] + \
        tokenizer.encode(" there")
    detok = IncrementalDetokenizer(tokenizer, [], True)
    assert "".join(detok.decode_token(t) for t in ids) == "hi there"
    detok = IncrementalDetokenizer(tokenizer, [], False)
    assert "".join(detok.decode_token(t) for t in ids) == "hi<|im_end|> there"


# --- the fast paths against the plain algorithm, on several kinds of tokenizer ---

class _ReferenceDetokenizer:
    """The algorithm spelled out through the tokenizer's public per-call
    methods, with nothing cached: what IncrementalDetokenizer must match
    piece for piece."""

    def __init__(self, tokenizer, prompt_token_ids, skip_special_tokens):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.tokens = tokenizer.convert_ids_to_tokens(prompt_token_ids[-5:],
                                                      skip_special_tokens=skip_special_tokens)
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)

    def _to_text(self, tokens):
        return self.tokenizer.convert_tokens_to_string(tokens) if tokens else ""

    def decode_token(self, token_id):
        new = self.tokenizer.convert_ids_to_tokens([token_id], skip_special_tokens=self.skip)
        self.tokens.extend(t for t in new if t is not None)
        before = self._to_text(self.tokens[self.prefix_offset:self.read_offset])
        after = self._to_text(self.tokens[self.prefix_offset:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.tokens)
            return after[len(before):]
        return ""

    def flush(self):
        before = self._to_text(self.tokens[self.prefix_offset:self.read_offset])
        after = self._to_text(self.tokens[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.tokens)
        return after[len(before):]


_CORPUS = ["The quick brown fox jumps over the lazy dog.", "hello world, and hello again!",
           "Serving engines batch requests; they don't wait.", "prompt: plain words here"] + TEXTS


def _fast(backend, **special):
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False,
                                   **special)


def _byte_level():
    from vllm.tools.make_tiny_model import build_tokenizer
    return build_tokenizer()


def _byte_fallback():
    """Llama-2 style: "▁" for spaces, no pre-tokenizer, byte-fallback tokens
    <0xNN> for characters outside the vocabulary, and a decoder that fuses the
    pieces and strips the first leading space."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for c in ["▁", "é", "ï"] + [chr(c) for c in range(33, 127)]:
        vocab.setdefault(c, len(vocab))
    merges = []
    for word in ["▁the", "▁quick", "▁hello", "▁world", "▁plain", "▁words", "▁here", "▁and",
                 "▁done", "▁café", "▁prompt", "ing", "er"]:
        left = word[0]
        for c in word[1:]:
            if (left, c) not in merges:
                merges.append((left, c))
            left += c
            vocab.setdefault(left, len(vocab))
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True,
                               fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return _fast(tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _metaspace():
    """Metaspace pre-tokenizer and decoder (the decoder drops the space of the
    first token it sees)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(_CORPUS * 4, trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    return _fast(tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _wordpiece():
    """BERT style: "##" continuation pieces, and a decoder that cleans up
    spaces before punctuation."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainers.WordPieceTrainer(
        vocab_size=300, special_tokens=["[UNK]", "[SEP]", "[CLS]"], show_progress=False))
    return _fast(tok, unk_token="[UNK]", sep_token="[SEP]", cls_token="[CLS]")


def _own_rules():
    """A fast tokenizer subclass with its own convert_tokens_to_string: must
    go through the tokenizer's methods, not the Rust backend."""
    from transformers import PreTrainedTokenizerFast

    class OwnRules(PreTrainedTokenizerFast):
        def convert_tokens_to_string(self, tokens):
            return super().convert_tokens_to_string(tokens)

    base = _byte_level()
    return OwnRules(tokenizer_object=base.backend_tokenizer, eos_token="<|endoftext|>",
                    additional_special_tokens=["<|im_start|>", "<|im_end|>"],
                    clean_up_tokenization_spaces=False)


def _slow_bytes():
    """A pure-Python tokenizer (one token per byte, decoded with errors ignored)."""
    from transformers import ByT5Tokenizer
    return ByT5Tokenizer()


# name -> (builder, goes through the Rust backend, splits multi-byte characters)
TOKENIZERS = {
    "byte_level": (_byte_level, True, True),
    "byte_fallback": (_byte_fallback, True, True),
    "metaspace": (_metaspace, True, False),
    "wordpiece": (_wordpiece, True, False),
    "own_rules": (_own_rules, False, True),
    "slow_bytes": (_slow_bytes, False, True),
}


@pytest.fixture(scope="module", params=list(TOKENIZERS))
def any_tokenizer(request):
    build, fast, splits = TOKENIZERS[request.param]
    return request.param, build(), fast, splits


def _stream(tok, text, specials):
    """``text``'s ids with special tokens at the start, in the middle (at a
    character boundary) and at the end."""
    ids = tok.encode(text, add_special_tokens=False)
    full = tok.decode(ids)

    def boundary(k):
        head, tail = tok.decode(ids[:k]), tok.decode(ids[k:])
        return head + tail == full and "\ufffd" not in head + tail

    mid = min((k for k in range(len(ids) + 1) if boundary(k)), key=lambda k: abs(2 * k - len(ids)))
    return [specials[0]] + ids[:mid] + [specials[-1]] + ids[mid:] + [specials[0]]


def _run(detok, ops):
    """Feed ids, with None meaning flush(); the list of returned pieces."""
    return [detok.flush() if op is None else detok.decode_token(op) for op in ops]


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_matches_full_decode_and_reference(any_tokenizer, text, skip):
    _name, tok, fast, splits = any_tokenizer
    specials = sorted(tok.all_special_ids)
    assert len(specials) >= 2
    ids = _stream(tok, text, specials)
    if splits and not text.isascii():
        assert any("\ufffd" in tok.decode([t]) or tok.decode([t]) == "" for t in ids)
    for spaces in (True, False):
        detok = IncrementalDetokenizer(tok, [], skip, spaces)
        assert (detok._backend is not None) == fast
        pieces = [detok.decode_token(t) for t in ids]
        assert all("\ufffd" not in p for p in pieces)
        assert "".join(pieces) + detok.flush() == tok.decode(ids, skip_special_tokens=skip)
        assert pieces == _run(_ReferenceDetokenizer(tok, [], skip), ids)
    # after a prompt, and cut off in the middle of a character (flush
    # releases what was held back, U+FFFD and all)
    prompt = tok.encode("prompt: plain words", add_special_tokens=False)
    cuts = [k for k in range(1, len(ids)) if tok.decode(ids[:k]).endswith("\ufffd")] or [len(ids)]
    for k in (cuts[0], len(ids)):
        ops = ids[:k] + [None] + ids[k:] + [None, None]
        got = _run(IncrementalDetokenizer(tok, prompt, skip), ops)
        assert got == _run(_ReferenceDetokenizer(tok, prompt, skip), ops)


@pytest.mark.parametrize("skip", [True, False])
def test_random_ids_match_reference(any_tokenizer, skip):
    """Random ids (mostly invalid UTF-8 for byte tokenizers), special tokens,
    ids past the vocabulary, and flushes at random points."""
    name, tok, _fast, _splits = any_tokenizer
    rng = random.Random(hash(name) % 1000 + skip)
    n = len(tok)
    # the pure-Python byte tokenizer cannot convert ids past its vocabulary at all
    top = n if name == "slow_bytes" else n + 8
    for _ in range(20):
        prompt = [rng.randrange(n) for _ in range(rng.randrange(8))]
        ops = [None if rng.random() < 0.05 else rng.randrange(top) for _ in range(60)]
        ops.append(None)
        assert _run(IncrementalDetokenizer(tok, prompt, skip), ops) == \
            _run(_ReferenceDetokenizer(tok, prompt, skip), ops)


def test_ids_past_vocabulary_add_no_text(tokenizer):
    ids = tokenizer.encode("café here")
    past = [len(tokenizer), len(tokenizer) + 100]
    for skip in (True, False):
        detok = IncrementalDetokenizer(tokenizer, [], skip)
        stream = ids[:3] + past + ids[3:] + past
        assert "".join(detok.decode_token(t) for t in stream) + detok.flush() == "café here"
