"""Incremental detokenization: the streamed pieces concatenate to the full
decode, and no piece ever holds half of a multi-byte character."""
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
