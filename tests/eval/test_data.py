"""Evaluation text and windows: the GPTQ protocol, the Hugging Face sliding-window loop, sources and errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import datasets
import huggingface_hub
import pytest
import torch
import torch.nn.functional as F

import quantkit
from quantkit.eval import eval_data, perplexity, text_data, token_windows
from quantkit.eval.data import Window, windows_of
from quantkit.errors import QuantkitError
from tests.conftest import random_model, tiny_config
from tests.helpers import ToyTokenizer

TEST_TXT = Path(__file__).resolve().parents[2] / "demo" / "model" / "test.txt"
PARAGRAPHS = [p for p in TEST_TXT.read_text(encoding="utf-8")[:6000].split("\n\n") if p.strip()][:6]
TEXT = "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 3


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and no ~/.cache. datasets and huggingface_hub read these variables at import, so their
    module constants are patched too (setting only the environment would still try the hub, with retries)."""
    home = tmp_path / "hf-home"
    for name, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(home),
                        "HF_DATASETS_CACHE": str(home / "datasets")}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))


@pytest.fixture(scope="module")
def tok(tokenizer_file):
    return quantkit.load_tokenizer(tokenizer_file)


def scored_positions(data):
    """Absolute positions of the scored targets, in scoring order."""
    return [t for w in data.windows for t in range(w.score_from, w.end)]


# --- non-overlapping windows: the GPTQ protocol ---------------------------------------------------


def gptq_windows(n_ids, seq_len):
    """IST-DASLab/gptq llama_eval: nsamples = numel // seqlen, batch = ids[i*seqlen:(i+1)*seqlen],
    shift_labels = batch[:, 1:] -> each window scores its positions 1..seqlen-1."""
    return [(i * seq_len, (i + 1) * seq_len, list(range(i * seq_len + 1, (i + 1) * seq_len)))
            for i in range(n_ids // seq_len)]


def test_non_overlapping_windows_by_hand():
    data = text_data(ToyTokenizer(), "abcdefghij", seq_len=4)  # BOS + 10 chars = 11 ids: 2 windows, 3 ids dropped
    assert data.protocol == "windows" and data.stride is None
    assert data.windows == [Window(0, 4, 1), Window(4, 8, 5)]
    assert data.n_tokens == 6
    assert data.targets(data.windows[1]).tolist() == [3 + ord(c) % 60 for c in "efg"]


@pytest.mark.parametrize("n_chars,seq_len", [(10, 4), (11, 4), (63, 8), (64, 8), (100, 7), (5, 6)])
def test_non_overlapping_windows_equal_gptq(n_chars, seq_len):
    data = text_data(ToyTokenizer(), "x" * n_chars, seq_len)
    assert [(w.start, w.end, list(range(w.score_from, w.end))) for w in data.windows] == \
        gptq_windows(n_chars + 1, seq_len)


# --- sliding windows: the Hugging Face perplexity guide --------------------------------------------


def hf_guide_loop(model, ids, max_length, stride):
    """The loop of https://huggingface.co/docs/transformers/perplexity, with labels shifted as the HF loss does.

    The guide weights each window's mean loss by `num_valid_tokens - batch_size`, which is off by one for
    every window after the first (their first label is already -100, so the shift drops nothing valid);
    here the per-token NLLs are summed instead, which is the quantity the guide means to compute.
    Returns (scored absolute positions in order, perplexity)."""
    encodings = ids[None]
    seq_len = encodings.size(1)
    positions, nll_sum, n_tokens = [], 0.0, 0
    prev_end_loc = 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc  # may be different from stride on last loop
        input_ids = encodings[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            logits = model(input_ids).double()
        shift_logits, shift_labels = logits[:, :-1], target_ids[:, 1:]  # what LlamaForCausalLM's loss does
        valid = (shift_labels != -100)[0]
        positions += [begin_loc + 1 + j for j in valid.nonzero().flatten().tolist()]
        nll_sum += F.cross_entropy(shift_logits[0], shift_labels[0], ignore_index=-100, reduction="sum").item()
        n_tokens += int(valid.sum())
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return positions, math.exp(nll_sum / n_tokens)


@pytest.fixture(scope="module")
def toy_model():
    return random_model(tiny_config(vocab_size=64))


# 1 + len(TEXT) = 262 ids: strides dividing and not dividing it, and stride == seq_len
@pytest.mark.parametrize("seq_len,stride", [(32, 8), (32, 13), (32, 32), (32, 31), (40, 1), (100, 50)])
def test_sliding_windows_reproduce_the_hf_guide(toy_model, seq_len, stride):
    tok = ToyTokenizer()
    ids = torch.tensor(tok.encode(TEXT))
    hf_positions, hf_ppl = hf_guide_loop(toy_model, ids, seq_len, stride)
    data = text_data(tok, TEXT, seq_len, stride)
    assert scored_positions(data) == hf_positions
    ours = perplexity(toy_model, tok, TEXT, seq_len=seq_len, stride=stride, batch_size=4, progress=False)
    assert ours.n_tokens == len(hf_positions) and ours.stride == stride
    assert ours.ppl == pytest.approx(hf_ppl, rel=1e-6)


@pytest.mark.parametrize("n_ids,seq_len,stride", [(262, 32, 8), (262, 32, 13), (100, 10, 9), (10, 10, 3),
                                                  (50, 8, 1), (33, 32, 16)])
def test_sliding_scores_every_token_after_the_first_exactly_once(n_ids, seq_len, stride):
    data = windows_of("ids", torch.arange(n_ids), seq_len, stride)
    assert scored_positions(data) == list(range(1, n_ids))
    assert all(w.end - w.start <= seq_len and w.score_from > w.start for w in data.windows)
    # each window after the first has seq_len - stride tokens of context before its scored ones
    assert all(w.score_from - w.start == seq_len - stride for w in data.windows[1:])


def test_stride_equal_to_seq_len_is_the_gptq_protocol_with_a_short_last_window():
    # the HF loop without overlap: each window's first token has no context and is not scored
    data = windows_of("ids", torch.arange(20), 8, stride=8)
    assert data.windows == [Window(0, 8, 1), Window(8, 16, 9), Window(16, 20, 17)]


def test_batches_group_equal_length_windows_in_order():
    data = windows_of("ids", torch.arange(18), 8, stride=4)  # windows of 8, 8, 8 tokens, then the last of 6
    assert [(w.start, w.end) for w in data.windows] == [(0, 8), (4, 12), (8, 16), (12, 18)]
    batches = list(data.batches(2))
    assert [[(w.start, w.end) for w in ws] for _, ws in batches] == [[(0, 8), (4, 12)], [(8, 16)], [(12, 18)]]
    for ids, windows in batches:
        assert ids.tolist() == [list(range(w.start, w.end)) for w in windows]


@pytest.mark.parametrize("batch_size", [1, 3, 100])
def test_batches_keep_every_window_once_in_order(batch_size):
    data = windows_of("ids", torch.arange(101), 16, stride=5)
    batches = list(data.batches(batch_size))
    assert [w for _, ws in batches for w in ws] == data.windows
    assert all(len(ws) <= batch_size and len({w.end - w.start for w in ws}) == 1 for _, ws in batches)


def test_fingerprint_identifies_text_seq_len_and_stride():
    tok = ToyTokenizer()
    prints = {text_data(tok, TEXT, 32).fingerprint(), text_data(tok, TEXT + "!", 32).fingerprint(),
              text_data(tok, TEXT, 16).fingerprint(), text_data(tok, TEXT, 32, stride=16).fingerprint(),
              text_data(tok, TEXT, 32, stride=8).fingerprint()}
    assert len(prints) == 5
    assert text_data(tok, TEXT, 32, stride=8).fingerprint() == text_data(tok, TEXT, 32, stride=8).fingerprint()


def test_describe_counts_windows_and_scored_tokens():
    data = text_data(ToyTokenizer(), "abcdefghij", seq_len=4, name="abc")
    assert data.describe() == {"name": "abc", "protocol": "windows", "seq_len": 4, "stride": None, "n_windows": 2,
                               "n_tokens": 6, "fingerprint": data.fingerprint()}


# --- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stride", [None, 2])
def test_text_shorter_than_one_window(stride):
    with pytest.raises(QuantkitError, match="fewer than one window of --seq-len 64"):
        text_data(ToyTokenizer(), "short", seq_len=64, stride=stride)


@pytest.mark.parametrize("stride", [0, -1, 33])
def test_bad_stride(stride):
    with pytest.raises(QuantkitError, match=f"--stride {stride}: must be between 1 and --seq-len \\(32\\)"):
        text_data(ToyTokenizer(), TEXT, seq_len=32, stride=stride)


@pytest.mark.parametrize("seq_len", [1, 0])
def test_seq_len_below_two(seq_len):
    with pytest.raises(QuantkitError, match=f"--seq-len {seq_len}: a window needs at least 2 tokens"):
        text_data(ToyTokenizer(), TEXT, seq_len=seq_len)


def test_eval_data_checks_the_protocol_before_reading_the_source():
    with pytest.raises(QuantkitError, match="--stride 0"):
        eval_data(ToyTokenizer(), "/nonexistent/file.txt", seq_len=8, stride=0)


# --- sources -------------------------------------------------------------------------------------------


def test_eval_data_from_txt(tmp_path, tok):
    path = tmp_path / "test.txt"
    path.write_text("\n\n".join(PARAGRAPHS), encoding="utf-8")
    data = eval_data(tok, path, seq_len=64)
    assert data.name == str(path)
    assert data.ids.tolist()[: len(data.windows) * 64] == tok.encode("\n\n".join(PARAGRAPHS))[: len(data.windows) * 64]
    assert len(data.windows) == len(tok.encode("\n\n".join(PARAGRAPHS))) // 64 > 1


def test_eval_data_max_tokens(tmp_path, tok):
    path = tmp_path / "test.txt"
    path.write_text("\n\n".join(PARAGRAPHS), encoding="utf-8")
    data = eval_data(tok, path, seq_len=32, stride=16, max_tokens=100)
    assert data.ids.tolist() == tok.encode("\n\n".join(PARAGRAPHS))[:100]
    assert data.windows[-1].end == 100


def test_eval_data_from_jsonl(tmp_path, tok, offline):
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps({"id": i, "body": p}) + "\n" for i, p in enumerate(PARAGRAPHS)))
    data = eval_data(tok, path, seq_len=64, text_field="body")
    # rows joined with "\n\n", tokenized once with one BOS
    assert data.ids.tolist() == tok.encode("\n\n".join(PARAGRAPHS))


def test_eval_data_from_a_dataset_dict_uses_its_test_split(tmp_path, tok, offline):
    path = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["training text, not this"] * 50}),
                          "test": datasets.Dataset.from_dict({"text": PARAGRAPHS})}).save_to_disk(str(path))
    data = eval_data(tok, path, seq_len=64, stride=32)
    assert data.ids.tolist() == tok.encode("\n\n".join(PARAGRAPHS))
    assert data.protocol == "sliding"


def test_wikitext2_offline_says_to_pass_a_local_file(tok, offline):
    # fails at once: offline mode makes datasets raise before any request (no retries)
    with pytest.raises(QuantkitError, match="wikitext2") as e:
        eval_data(tok, "wikitext2", seq_len=64)
    assert "--dataset" in str(e.value) and "local file" in str(e.value)


# ---- a tokenizer larger than the model ------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda tok, vocab: eval_data(tok, [TEXT], seq_len=16, vocab_size=vocab),
    lambda tok, vocab: text_data(tok, TEXT, seq_len=16, stride=8, vocab_size=vocab),
    lambda tok, vocab: token_windows(tok, TEXT, 16, vocab_size=vocab),
], ids=["eval_data", "text_data", "token_windows"])
def test_ids_beyond_the_models_vocab_are_refused_naming_the_tokenizer(tok, make):
    high = max(tok.encode(TEXT))
    make(tok, high + 1)  # the largest id fits
    with pytest.raises(QuantkitError, match=rf"tokenizer.model: gives token id {high}, but the model's config.json "
                                            rf"has vocab_size {high} \(this tokenizer has 4096 ids\)") as error:
        make(tok, high)
    assert str(tok.path) in str(error.value)

