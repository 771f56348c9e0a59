"""The sentencepiece wrapper against transformers' LlamaTokenizer on the bundled demo tokenizer."""

import pytest
import torch
import transformers

import quantkit
from quantkit.errors import QuantkitError
from quantkit.model.tokenizer import TextStream
from tests.conftest import DEMO_MODEL

TEXTS = [
    "Hello world",
    "Return the number of items in a container.",
    "two  spaces   and three",
    "digits 12345, 3.14159 and 2026-11-26",
    "line one\nline two\n\n    indented code\ttab",
    "naïve café — Größe, 日本語, emoji 😀",
    "def f(x):\n    return x ** 2  # square",
    "trailing space ",
]


@pytest.fixture(scope="module")
def ours():
    return quantkit.load_tokenizer(DEMO_MODEL)


@pytest.fixture(scope="module")
def theirs():
    return transformers.LlamaTokenizer.from_pretrained(DEMO_MODEL)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_and_decode_match_transformers(ours, theirs, text):
    ids = ours.encode(text)
    assert ids == theirs.encode(text)
    assert ids[0] == 1 and ours.encode(text, bos=False) == ids[1:]
    assert ours.encode(text, eos=True) == ids + [2]
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True) == text


@pytest.mark.parametrize("text", [" leading space", "  two leading", "\tleading tab"])
def test_leading_whitespace_follows_sentencepiece(ours, text):
    """Meta's reference tokenizes with sentencepiece, which always adds the dummy prefix; transformers' fast
    Metaspace skips it when text already starts with a space, and decodes such text one space short."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(DEMO_MODEL / "tokenizer.model"))
    assert ours.encode(text, bos=False) == sp.encode(text)
    assert ours.decode(ours.encode(text)) == text  # lossless


def test_special_token_text_is_not_a_control_token(ours):
    assert 2 not in ours.encode("a</s>b")  # as in Meta's reference: typed text cannot end the sequence


def test_batch_is_left_padded_and_masked(ours):
    ids, mask = ours.encode_batch(["a longer piece of text", "short"])
    assert ids.shape == mask.shape and ids.shape[0] == 2
    n = len(ours.encode("short"))
    assert mask[1].tolist() == [0] * (ids.shape[1] - n) + [1] * n
    assert (ids[1, : ids.shape[1] - n] == ours.pad_id).all() and ours.pad_id == 0


def test_chat_format(ours):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Sum 2+2?"}]
    want = (ours.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello. ", bos=True, eos=True)
            + ours.encode("[INST] Sum 2+2? [/INST]", bos=True))
    assert ours.encode_chat(messages) == want
    assert ours.encode_chat([{"role": "user", "content": " Hi "}]) == ours.encode("[INST] Hi [/INST]")


def test_chat_rejects_bad_role_order(ours):
    with pytest.raises(QuantkitError, match="roles must alternate"):
        ours.encode_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_text_stream_keeps_spaces_and_whole_characters(ours):
    prompt = ours.encode("The answer")
    continuation = ours.encode("is naïve 😀 yes", bos=False)  # "▁is ...": the dummy prefix is the space
    stream = TextStream(ours, prefix=prompt)
    pieces = [stream.push(i) for i in continuation]
    assert "".join(pieces) == " is naïve 😀 yes"
    assert all("\ufffd" not in p for p in pieces)


def test_decode_accepts_tensors(ours):
    assert ours.decode(torch.tensor(ours.encode("abc"))) == "abc"
