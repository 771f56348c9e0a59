"""Sampling into [n_samples, seq_len] windows (modes random and document) and the on-disk token cache."""

from __future__ import annotations

import logging
from pathlib import Path

import datasets
import huggingface_hub
import pytest
import sentencepiece as spm
import torch

import quantkit
from quantkit.calibrate import calibration_tokens
from quantkit.calibrate.sampling import distinct_randint
from quantkit.errors import QuantkitError

TRAIN_TXT = Path(__file__).resolve().parents[2] / "demo" / "model" / "train.txt"
TEXT = TRAIN_TXT.read_text(encoding="utf-8")[:30_000]  # about 8k demo tokens
DOCS = [p for p in TRAIN_TXT.read_text(encoding="utf-8")[:200_000].split("\n\n") if p.strip()]


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path / "quantkit-cache"))


@pytest.fixture
def tok(tokenizer_file):
    return quantkit.load_tokenizer(tokenizer_file)


@pytest.fixture
def encode_calls(tok, monkeypatch):
    """Counts tok.encode calls (the only way calibrate tokenizes)."""
    calls = []
    original = tok.encode

    def spy(text, bos=True, eos=False):
        calls.append(len(text))
        return original(text, bos=bos, eos=eos)

    monkeypatch.setattr(tok, "encode", spy)
    return calls


def contains_window(stream: torch.Tensor, row: torch.Tensor) -> bool:
    return len(stream) >= len(row) and bool((stream.unfold(0, len(row), 1) == row).all(1).any())


# ---- mode "random" ------------------------------------------------------------------------------


def test_random_windows_are_slices_of_the_text_tokenized_once_with_bos(tok, tmp_path):
    got = calibration_tokens([TEXT], tok, n_samples=32, seq_len=128, seed=3, cache_dir=tmp_path)
    assert got.shape == (32, 128) and got.dtype == torch.long and got.is_contiguous()
    stream = torch.tensor(tok.encode(TEXT, bos=True))
    assert (stream == tok.bos_id).sum() == 1 and stream[0] == tok.bos_id
    assert all(contains_window(stream, row) for row in got)
    assert len({tuple(row.tolist()) for row in got}) == 32, "distinct start offsets"


def test_seed_decides_the_windows(tok, tmp_path):
    a = calibration_tokens([TEXT], tok, n_samples=8, seq_len=64, seed=0, cache_dir=tmp_path / "a")
    b = calibration_tokens([TEXT], tok, n_samples=8, seq_len=64, seed=0, cache_dir=tmp_path / "b")  # fresh tokenization
    c = calibration_tokens([TEXT], tok, n_samples=8, seq_len=64, seed=0, cache_dir=tmp_path / "a")  # from the cache
    d = calibration_tokens([TEXT], tok, n_samples=8, seq_len=64, seed=1, cache_dir=tmp_path / "a")
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(a, d)


def test_text_shorter_than_seq_len(tok, tmp_path):
    n_tokens = len(tok.encode("A short calibration text.", bos=True))
    with pytest.raises(QuantkitError, match=rf"the text has {n_tokens} tokens, fewer than --seq-len 64: "):
        calibration_tokens(["A short calibration text."], tok, n_samples=1, seq_len=64, cache_dir=tmp_path)


def test_more_samples_than_windows(tok, tmp_path):
    text = TEXT[:2000]
    n_tokens = len(tok.encode(text, bos=True))
    seq_len = n_tokens - 2  # room for exactly 3 windows
    with pytest.raises(QuantkitError, match=rf"{n_tokens} tokens leave room for only 3 distinct windows of "
                                            rf"--seq-len {seq_len}, fewer than --n-samples 4"):
        calibration_tokens([text], tok, n_samples=4, seq_len=seq_len, cache_dir=tmp_path)
    got = calibration_tokens([text], tok, n_samples=3, seq_len=seq_len, cache_dir=tmp_path)
    stream = torch.tensor(tok.encode(text, bos=True))
    assert sorted(got.tolist()) == sorted(stream.unfold(0, seq_len, 1).tolist())  # all three, once each
    whole = calibration_tokens([text], tok, n_samples=1, seq_len=n_tokens, cache_dir=tmp_path)
    assert torch.equal(whole[0], stream)


def test_distinct_randint_is_deterministic_and_distinct():
    a = distinct_randint(10, 10, torch.Generator().manual_seed(0))
    assert sorted(a.tolist()) == list(range(10))
    assert torch.equal(a, distinct_randint(10, 10, torch.Generator().manual_seed(0)))
    big = distinct_randint(10**9, 1000, torch.Generator().manual_seed(0))
    assert len(set(big.tolist())) == 1000 and int(big.max()) < 10**9


def test_bad_arguments(tok):
    with pytest.raises(QuantkitError, match=r"--calib-mode 'shuffle' \(mode= in Python\) is unknown: use one of random, document"):
        calibration_tokens([TEXT], tok, mode="shuffle")
    with pytest.raises(QuantkitError, match=r"n_samples=0"):
        calibration_tokens([TEXT], tok, n_samples=0)
    with pytest.raises(QuantkitError, match=r"seq_len=0"):
        calibration_tokens([TEXT], tok, seq_len=0)


# ---- mode "document" ----------------------------------------------------------------------------


def test_document_windows_come_from_distinct_long_documents(tok, tmp_path):
    seq_len = 96
    tokenized = [torch.tensor(tok.encode(d, bos=True)) for d in DOCS]
    long_docs = [i for i, ids in enumerate(tokenized) if len(ids) >= seq_len]
    assert len(long_docs) >= 12, "the demo text has long enough paragraphs"
    got = calibration_tokens(DOCS, tok, n_samples=12, seq_len=seq_len, seed=5, mode="document", cache_dir=tmp_path)
    assert got.shape == (12, seq_len) and got.dtype == torch.long
    sources = []
    for row in got:
        matches = [i for i in long_docs if contains_window(tokenized[i], row)]
        assert matches, "every window lies inside one document's tokens"
        sources.append(matches[0])
    assert len(set(sources)) == 12, "one window per document"
    again = calibration_tokens(DOCS, tok, n_samples=12, seq_len=seq_len, seed=5, mode="document", cache_dir=tmp_path)
    other = calibration_tokens(DOCS, tok, n_samples=12, seq_len=seq_len, seed=6, mode="document", cache_dir=tmp_path)
    assert torch.equal(got, again) and not torch.equal(got, other)


def test_too_few_long_documents_is_an_error(tok, tmp_path):
    docs = [TEXT[:3000], TEXT[3000:6000], "short one", "short two"]
    lengths = [len(tok.encode(d, bos=True)) for d in docs]
    seq_len = min(lengths[:2])
    with pytest.raises(QuantkitError, match=rf"only 2 of 4 documents have at least --seq-len {seq_len} tokens, "
                                            rf"fewer than --n-samples 3: .*--calib-mode random"):
        calibration_tokens(docs, tok, n_samples=3, seq_len=seq_len, mode="document", cache_dir=tmp_path)
    assert calibration_tokens(docs, tok, n_samples=2, seq_len=seq_len, mode="document", cache_dir=tmp_path).shape \
        == (2, seq_len)
    too_long = max(lengths) + 1
    with pytest.raises(QuantkitError, match=rf"no document has --seq-len {too_long} tokens \(the longest of the 4 has "
                                            rf"{max(lengths)} tokens\)"):
        calibration_tokens(docs, tok, n_samples=1, seq_len=too_long, mode="document", cache_dir=tmp_path)


# ---- the token cache ----------------------------------------------------------------------------


def test_second_run_does_not_tokenize(tok, encode_calls, tmp_path):
    first = calibration_tokens([TEXT], tok, n_samples=8, seq_len=64, cache_dir=tmp_path)
    assert encode_calls == [len(TEXT)], "one encode call for the whole text"
    second = calibration_tokens([TEXT], tok, n_samples=8, seq_len=64, cache_dir=tmp_path)
    other = calibration_tokens([TEXT], tok, n_samples=4, seq_len=32, seed=9, cache_dir=tmp_path)
    assert len(encode_calls) == 1, "the cache holds the tokenization, whatever the sampling parameters"
    assert torch.equal(first, second) and other.shape == (4, 32)
    files = list(tmp_path.iterdir())
    assert [f.suffix for f in files] == [".safetensors"] and files[0].name.startswith("random-")


def test_changed_source_file_invalidates(tok, encode_calls, tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(TEXT, encoding="utf-8")
    calibration_tokens(path, tok, n_samples=4, seq_len=64, cache_dir=tmp_path / "cache")
    calibration_tokens(path, tok, n_samples=4, seq_len=64, cache_dir=tmp_path / "cache")
    assert len(encode_calls) == 1
    path.write_text(TEXT.replace("e", "a"), encoding="utf-8")  # same size, new content
    changed = calibration_tokens(path, tok, n_samples=4, seq_len=64, cache_dir=tmp_path / "cache")
    assert len(encode_calls) == 2
    expected = calibration_tokens([TEXT.replace("e", "a")], tok, n_samples=4, seq_len=64, cache_dir=tmp_path / "cache")
    assert torch.equal(changed, expected) and len(encode_calls) == 2, "same content, same entry"


def test_changed_tokenizer_invalidates(tok, encode_calls, tmp_path, tokenizer_file):
    calibration_tokens([TEXT], tok, n_samples=4, seq_len=64, cache_dir=tmp_path / "cache")
    copy = tmp_path / "copy" / "tokenizer.model"
    copy.parent.mkdir()
    copy.write_bytes(tokenizer_file.read_bytes())
    same = quantkit.load_tokenizer(copy)
    same.encode = tok.encode  # the spy
    calibration_tokens([TEXT], same, n_samples=4, seq_len=64, cache_dir=tmp_path / "cache")
    assert len(encode_calls) == 1, "keyed by the tokenizer.model bytes, not its path"

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "other"), vocab_size=300,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    other = quantkit.load_tokenizer(tmp_path / "other.model")
    other_calls = []
    original = other.encode
    other.encode = lambda text, bos=True, eos=False: other_calls.append(1) or original(text, bos, eos)
    got = calibration_tokens([TEXT], other, n_samples=4, seq_len=64, cache_dir=tmp_path / "cache")
    assert other_calls == [1] and int(got.max()) < 300
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_mode_is_part_of_the_key(tok, encode_calls, tmp_path):
    calibration_tokens(DOCS, tok, n_samples=2, seq_len=64, mode="random", cache_dir=tmp_path)
    assert len(encode_calls) == 1
    calibration_tokens(DOCS, tok, n_samples=2, seq_len=64, mode="document", cache_dir=tmp_path)
    assert len(encode_calls) > 1
    assert sorted(f.name.split("-")[0] for f in tmp_path.iterdir()) == ["document", "random"]


def test_document_cache_grows_with_the_documents_visited(tok, encode_calls, tmp_path):
    calibration_tokens(DOCS, tok, n_samples=4, seq_len=96, seed=0, mode="document", cache_dir=tmp_path)
    visited = len(encode_calls)
    assert 4 <= visited < len(DOCS), "documents are tokenized lazily, as GPTQ does for C4"
    calibration_tokens(DOCS, tok, n_samples=4, seq_len=96, seed=0, mode="document", cache_dir=tmp_path)
    assert len(encode_calls) == visited
    calibration_tokens(DOCS, tok, n_samples=4, seq_len=96, seed=1, mode="document", cache_dir=tmp_path)
    more = len(encode_calls) - visited
    calibration_tokens(DOCS, tok, n_samples=4, seq_len=96, seed=1, mode="document", cache_dir=tmp_path)
    calibration_tokens(DOCS, tok, n_samples=4, seq_len=96, seed=0, mode="document", cache_dir=tmp_path)
    assert len(encode_calls) == visited + more, "both seeds' documents are cached"


def test_cache_location_env_and_default(tok, tmp_path, monkeypatch):
    calibration_tokens([TEXT], tok, n_samples=2, seq_len=32)  # QUANTKIT_CACHE from the offline fixture
    assert len(list((tmp_path / "quantkit-cache" / "calib").glob("random-*.safetensors"))) == 1
    monkeypatch.delenv("QUANTKIT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    calibration_tokens([TEXT], tok, n_samples=2, seq_len=32)
    assert len(list((tmp_path / "home" / ".cache" / "quantkit" / "calib").glob("random-*.safetensors"))) == 1


def test_failed_cache_write_leaves_nothing_and_still_samples(tok, encode_calls, tmp_path, monkeypatch, caplog):
    import safetensors.torch

    def half_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", half_write)
    with caplog.at_level(logging.WARNING, logger="quantkit"):
        got = calibration_tokens([TEXT], tok, n_samples=4, seq_len=64, cache_dir=tmp_path)
    assert got.shape == (4, 64)
    assert "could not write the token cache" in caplog.text
    assert list(tmp_path.iterdir()) == [], "neither the entry nor its temporary file"


def test_corrupt_cache_entry_is_retokenized(tok, encode_calls, tmp_path, caplog):
    first = calibration_tokens([TEXT], tok, n_samples=4, seq_len=64, cache_dir=tmp_path)
    (entry,) = tmp_path.iterdir()
    entry.write_bytes(b"\x00garbage")
    with caplog.at_level(logging.WARNING, logger="quantkit"):
        again = calibration_tokens([TEXT], tok, n_samples=4, seq_len=64, cache_dir=tmp_path)
    assert "unreadable" in caplog.text and len(encode_calls) == 2 and torch.equal(first, again)
    calibration_tokens([TEXT], tok, n_samples=4, seq_len=64, cache_dir=tmp_path)
    assert len(encode_calls) == 2, "rewritten by the second run"


def test_unwritable_cache_dir_warns(tok, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.WARNING, logger="quantkit"):
        got = calibration_tokens([TEXT], tok, n_samples=2, seq_len=32, cache_dir=blocker / "calib")
    assert got.shape == (2, 32) and "could not write the token cache" in caplog.text


# ---- ids against the model's vocabulary ---------------------------------------------------------


@pytest.mark.parametrize("cached", [False, True], ids=["tokenized", "cached"])
@pytest.mark.parametrize("mode", ["random", "document"])
def test_text_tokenized_beyond_the_models_vocab_is_refused(tok, tmp_path, mode, cached):
    """A tokenizer.model with more pieces (4096) than the model's config.json vocab_size; the cache has no model."""
    kwargs = dict(n_samples=4, seq_len=64, seed=0, mode=mode, cache_dir=tmp_path)
    windows = calibration_tokens(DOCS, tok, **kwargs, vocab_size=4096)
    high = int(windows.max())
    assert torch.equal(calibration_tokens(DOCS, tok, **kwargs, vocab_size=high + 1), windows)
    if not cached:
        for entry in tmp_path.iterdir():
            entry.unlink()
    with pytest.raises(QuantkitError, match=rf"tokenizer.model: gives token id {high}, but the model's config.json "
                                            rf"has vocab_size {high} \(this tokenizer has 4096 ids\)"):
        calibration_tokens(DOCS, tok, **kwargs, vocab_size=high)


def test_ready_ids_of_added_tokens_are_the_tokenizers_but_not_a_smaller_models(tmp_path):
    directory = tmp_path / "tok"
    directory.mkdir()
    (directory / "tokenizer.model").write_bytes((TRAIN_TXT.parent / "tokenizer.model").read_bytes())
    (directory / "added_tokens.json").write_text('{"<pad>": 4096}')
    tokens = torch.full((2, 8), 4096)
    added = quantkit.load_tokenizer(directory)
    assert torch.equal(calibration_tokens(tokens, added, n_samples=2, seq_len=8), tokens)  # len(tokenizer) 4097
    with pytest.raises(QuantkitError, match=r"token id 4096 is outside the tokenizer's vocabulary \[0, 4096\)"):
        calibration_tokens(tokens, added, n_samples=2, seq_len=8, vocab_size=4096)
    with pytest.raises(QuantkitError, match=r"token id 4096 is outside the tokenizer's vocabulary \[0, 4096\)"):
        calibration_tokens(tokens, quantkit.load_tokenizer(TRAIN_TXT.parent), n_samples=2, seq_len=8)
