"""The sentencepiece wrapper against transformers' LlamaTokenizer on the bundled demo tokenizer."""

import json
import logging
import shutil

import pytest
import torch
import transformers

import quantkit
from quantkit.errors import QuantkitError
from quantkit.model.generate import SamplingConfig, generate
from quantkit.model.tokenizer import TextStream
from tests.conftest import DEMO_MODEL, random_model, tiny_config

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


# ---- added tokens and ids beyond the vocabulary --------------------------------------------------

PIECES = 4096  # the demo tokenizer's


def entry(content, special):
    return {"content": content, "special": special, "lstrip": False, "rstrip": False, "normalized": False,
            "single_word": False}


# name -> (added_tokens.json, keys merged into tokenizer_config.json, {id: (content, special)} as transformers 5 has it)
LAYOUTS = {
    "added_tokens.json pad": ({"<pad>": 4096}, {}, {4096: ("<pad>", False)}),
    "added_tokens.json pad named special": ({"<pad>": 4096}, {"pad_token": "<pad>"}, {4096: ("<pad>", True)}),
    "decoder special and not": (None, {"added_tokens_decoder": {"0": entry("<unk>", True), "1": entry("<s>", True),
                                                                "2": entry("</s>", True), "4096": entry("<pad>", True),
                                                                "4097": entry("<extra>", False)}},
                                {4096: ("<pad>", True), 4097: ("<extra>", False)}),
    "decoder wins over added_tokens.json": ({"<zzz>": 4096}, {"added_tokens_decoder": {"4096": entry("<pad>", True)}},
                                            {4096: ("<pad>", True)}),
    "collision renumbered": ({"<pad>": 4096, "<foo>": 5}, {}, {4096: ("<foo>", False), 4097: ("<pad>", False)}),
    "gap renumbered": ({"<x>": 4100}, {}, {4096: ("<x>", False)}),
    "named specials appended": ({"<zz>": 4096}, {"pad_token": "<pad>", "additional_special_tokens": ["<a1>"]},
                                {4096: ("<zz>", False), 4097: ("<pad>", True), 4098: ("<a1>", True)}),
}


def added_layout(directory, added=None, config=None):
    """The demo tokenizer files in `directory`, with an added_tokens.json and tokenizer_config.json keys."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(DEMO_MODEL / name, directory / name)
    if added is not None:
        (directory / "added_tokens.json").write_text(json.dumps(added))
    if config:
        tokenizer_config = json.loads((DEMO_MODEL / "tokenizer_config.json").read_text())
        (directory / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, **config}))
    return directory


@pytest.fixture(params=sorted(LAYOUTS))
def layout(request, tmp_path):
    added, config, want = LAYOUTS[request.param]
    return added_layout(tmp_path / "tok", added, config), want


def test_added_tokens_are_numbered_as_transformers_numbers_them(layout):
    directory, want = layout
    ours, theirs = quantkit.load_tokenizer(directory), transformers.AutoTokenizer.from_pretrained(directory)
    assert {i: (t.content, t.special) for i, t in ours.added.items()} == want
    assert (ours.vocab_size, len(ours)) == (theirs.vocab_size, len(theirs)) == (PIECES, PIECES + len(want))


def test_decode_with_added_and_unknown_ids_matches_transformers(layout):
    directory, _ = layout
    ours, theirs = quantkit.load_tokenizer(directory), transformers.AutoTokenizer.from_pretrained(directory)
    words = ours.encode("Hello world 😀 x", bos=False)  # byte-fallback pieces too
    for extra in range(PIECES - 1, PIECES + 5):  # a piece, the added tokens, ids beyond every token
        for ids in ([1] + words + [extra], words[:1] + [extra] + words[1:], [extra] + words,
                    [1, extra, 0, 2] + words + [extra, 3, extra]):
            assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), ids


def test_failing_layout_decodes_the_pad_as_text_and_counts_it(tmp_path):
    tok = quantkit.load_tokenizer(added_layout(tmp_path, {"<pad>": 4096}))
    hello = tok.encode("Hello")
    assert tok.decode(hello + [4096] + tok.encode("Hello", bos=False)) == "Hello<pad> Hello"
    assert len(tok) == 4097 and tok.vocab_size == 4096


def test_renumbered_added_token_is_warned_about(tmp_path, caplog):
    quantkit.load_tokenizer(added_layout(tmp_path, {"<pad>": 4096, "<foo>": 5}))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("'<foo>' declares id 5" in w and "id 4096" in w and "added_tokens.json" in w for w in warnings)


def test_unknown_ids_decode_as_nothing_with_one_warning(ours, caplog):
    fresh = quantkit.load_tokenizer(DEMO_MODEL)  # the warning is once per Tokenizer
    words = fresh.encode("Hello world", bos=False)
    assert fresh.decode(words + [4150, -1] + words) == fresh.decode(words + words)
    assert fresh.decode([4159]) == ""
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "token id 4150" in warnings[0] and "tokenizer.model" in warnings[0]


def test_text_stream_passes_over_unknown_and_added_ids(tmp_path):
    tok = quantkit.load_tokenizer(added_layout(tmp_path, {"<pad>": 4096}))
    stream = TextStream(tok, prefix=tok.encode("The answer"))
    pieces = [stream.push(i) for i in [4150] + tok.encode("is", bos=False) + [4096, 4150, 4096]
              + tok.encode("yes", bos=False)]
    assert "".join(pieces) == " is<pad><pad> yes"
    assert pieces[0] == ""  # the unknown id


def test_unk_and_pad_vanish_as_with_skip_special_tokens(ours, theirs):
    ids = ours.encode("a b") + [ours.pad_id, 0] + ours.encode("c", bos=False)
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True) == "a b c"


MALFORMED = [
    ("added_tokens.json", "{not json", None, "added_tokens.json: not valid JSON"),
    ("added_tokens.json", "[4096]", None, "added_tokens.json: holds a JSON list, not an object"),
    ("added_tokens.json", '{"<pad>": "x"}', None, r"added_tokens.json: the id of '<pad>' is 'x', not a token id"),
    ("added_tokens.json", '{"<pad>": -3}', None, "added_tokens.json: the id of '<pad>' is -3"),
    ("added_tokens.json", '{"<pad>": true}', None, "added_tokens.json: the id of '<pad>' is True"),
    ("tokenizer_config.json", None, {"added_tokens_decoder": [1, 2]}, "tokenizer_config.json: added_tokens_decoder "
                                                                     "must map ids to tokens"),
    ("tokenizer_config.json", None, {"added_tokens_decoder": {"x": entry("<pad>", True)}},
     "tokenizer_config.json: added_tokens_decoder key 'x' is 'x', not a token id"),
    ("tokenizer_config.json", None, {"added_tokens_decoder": {"4096": {"special": True}}},
     r"tokenizer_config.json: added_tokens_decoder\['4096'\] must be"),
    ("tokenizer_config.json", None, {"added_tokens_decoder": {"4096": {"content": "<pad>", "special": "yes"}}},
     r"tokenizer_config.json: added_tokens_decoder\['4096'\] must be"),
    ("tokenizer_config.json", None, {"pad_token": 7}, "tokenizer_config.json: pad_token must be a token"),
    ("tokenizer_config.json", None, {"additional_special_tokens": "<a>"},
     "tokenizer_config.json: additional_special_tokens must be a list"),
    ("special_tokens_map.json", "{]", None, "special_tokens_map.json: not valid JSON"),
]


@pytest.mark.parametrize("name, text, config, message", MALFORMED)
def test_malformed_added_token_files_are_one_line_naming_the_file(tmp_path, name, text, config, message):
    directory = added_layout(tmp_path, config=config)
    if text is not None:
        (directory / name).write_text(text)
    with pytest.raises(QuantkitError, match=message) as error:
        quantkit.load_tokenizer(directory)
    assert "\n" not in str(error.value) and str(directory / name) in str(error.value)


@pytest.mark.parametrize("ids", [[1, 250, 300], torch.tensor([[1, 300], [1, 5]])])
def test_check_ids_names_the_tokenizer_the_id_and_the_vocab(ours, ids):
    ours.check_ids(ids, 301)
    with pytest.raises(QuantkitError, match=r"tokenizer.model: gives token id \d+, but the model's config.json has "
                                            r"vocab_size 300 \(this tokenizer has 4096 ids\)"):
        ours.check_ids(ids, 300)


def test_generate_refuses_prompt_ids_beyond_the_model():
    model = random_model(tiny_config(vocab_size=300))
    assert generate(model, [[1, 299]], SamplingConfig(max_new_tokens=1))  # the last id fits
    with pytest.raises(QuantkitError, match=r"prompt token id 300 is outside the model's vocabulary \[0, 300\)"):
        generate(model, [[1, 300]], SamplingConfig(max_new_tokens=1))
