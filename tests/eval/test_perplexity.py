import json
import math

import pytest
import torch
import torch.nn.functional as F

import quantkit
from quantkit.eval import perplexity, token_windows
from quantkit.errors import QuantkitError
from tests.conftest import SHARED_MODEL, random_model, tiny_config
from tests.helpers import ToyTokenizer

TEXT = ("The quick brown fox jumps over the lazy dog. " * 40).strip()




def test_windows_follow_the_gptq_protocol():
    windows = token_windows(ToyTokenizer(), "abcdefghij", seq_len=4)  # BOS + 10 chars = 11 tokens -> 2 windows
    assert windows.tolist() == [[1, 3 + ord("a") % 60, 3 + ord("b") % 60, 3 + ord("c") % 60],
                                [3 + ord(c) % 60 for c in "defg"]]


def test_perplexity_equals_a_hand_computation():
    model = random_model(tiny_config(vocab_size=64))
    tok = ToyTokenizer()
    result = perplexity(model, tok, TEXT, seq_len=32, batch_size=3, progress=False)
    ids = tok.encode(TEXT)
    nlls = []
    for start in range(0, len(ids) - 31, 32):
        window = torch.tensor(ids[start:start + 32])
        with torch.no_grad():
            logp = F.log_softmax(model(window[None])[0].double(), -1)
        nlls += [-logp[t, window[t + 1]].item() for t in range(31)]
    assert result.n_windows == len(ids) // 32 and result.n_tokens == len(nlls)
    assert result.ppl == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-6)


def test_text_shorter_than_one_window():
    with pytest.raises(QuantkitError, match="fewer than one window of --seq-len 2048"):
        perplexity(random_model(tiny_config(vocab_size=64)), ToyTokenizer(), "short", seq_len=2048)


@pytest.mark.skipif(not SHARED_MODEL.is_dir(), reason="../shared/models/tiny-llama2-mha is not present")
def test_matches_transformers_reference_on_shared_model():
    ref = json.loads((SHARED_MODEL / "REFERENCE.json").read_text())
    text = (SHARED_MODEL / "test.txt").read_text()
    result = perplexity(quantkit.load(SHARED_MODEL, dtype="fp32"), quantkit.load_tokenizer(SHARED_MODEL), text,
                        seq_len=ref["seq_len"], batch_size=16, progress=False)
    assert result.n_windows == ref["windows"]
    assert result.ppl == pytest.approx(ref["test_ppl_fp32"], rel=1e-3)
