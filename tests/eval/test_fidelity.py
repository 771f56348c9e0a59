"""Logit fidelity: llama.cpp's KL / top-k / delta-p definitions, the TopK lower bound, and the statistics."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from quantkit.eval import evaluate, text_data
from quantkit.eval.fidelity import (DP_PERCENTILES, KL_PERCENTILES, FidelityAccumulator, TopK, compare_tokens, compress,
                           kl_divergence, pearson)
from tests.conftest import random_model, tiny_config
from tests.helpers import ToyTokenizer

TEXT = "Pack my box with five dozen liquor jugs, then jump over the lazy dog and the quick brown fox. " * 4
KL_KEYS = ("mean", "stderr", "max", "p99_9", "p99", "p90", "median", "p10", "p5", "p1", "min")
DELTA_P_KEYS = ("mean", "stderr", "rms", "rms_stderr", "max", "p99_9", "p99", "p95", "p90", "p75", "median", "p25",
                "p10", "p5", "p1", "p0_1", "min")




def random_logprobs(n, vocab, seed, temperature=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(temperature * torch.randn(n, vocab, generator=g), -1)


def perturbed(model, scale, seed=1):
    """A copy of `model` with relative noise on every weight: a stand-in for a quantized model."""
    torch.manual_seed(seed)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * p.abs().mean() * torch.randn_like(p))
    return other


@pytest.fixture(scope="module")
def data():
    return text_data(ToyTokenizer(), TEXT, seq_len=32)  # 377 ids: 11 windows, 341 scored tokens


@pytest.fixture(scope="module")
def base():
    return random_model(tiny_config(vocab_size=64))


@pytest.fixture(scope="module")
def result(base, data):
    return evaluate(perturbed(base, 0.3), data, base=base, batch_size=4, progress=False)


def direct_tokens(model, base, data):
    """Per-token measures computed straight from the two models' logits, in double precision."""
    kl, same, top5, dp, base_nll, nll = [], [], [], [], [], []
    for w in data.windows:
        ids, targets = data.ids[w.start:w.end][None], data.targets(w)
        with torch.no_grad():
            q = torch.log_softmax(model(ids)[0].double(), -1)[w.score_from - 1 - w.start:w.end - 1 - w.start]
            p = torch.log_softmax(base(ids)[0].double(), -1)[w.score_from - 1 - w.start:w.end - 1 - w.start]
        for t in range(len(targets)):
            kl.append(float((p[t].exp() * (p[t] - q[t])).sum()))
            same.append(float(p[t].argmax() == q[t].argmax()))
            top5.append(len(set(p[t].topk(5).indices.tolist()) & set(q[t].topk(5).indices.tolist())) / 5)
            dp.append(float(q[t, targets[t]].exp() - p[t, targets[t]].exp()))
            base_nll.append(-float(p[t, targets[t]]))
            nll.append(-float(q[t, targets[t]]))
    return {k: np.array(v) for k, v in dict(kl=kl, same=same, top5=top5, dp=dp, base_nll=base_nll, nll=nll).items()}


def llama_cpp_stderr(x):
    """llama.cpp's standard error of a mean: sqrt(var / (n - 1)), var the population variance."""
    return math.sqrt(np.var(x) / (len(x) - 1))


# --- a model against itself -------------------------------------------------------------------------------


def test_a_model_against_itself_is_perfect(base, data):
    result = evaluate(base, data, base=base, batch_size=3, progress=False)
    f = result.fidelity
    assert f["source"] == "in-memory" and f["top_k"] is None
    assert f["kl"]["max"] < 1e-9 and f["kl"]["mean"] < 1e-9
    assert f["top1"] == {"agreement": 1.0, "stderr": 0.0}
    assert f["top5_overlap"] == 1.0
    assert f["delta_p"]["max"] == f["delta_p"]["min"] == f["delta_p"]["rms"] == 0.0
    assert f["nll_correlation"] == pytest.approx(1.0, abs=1e-9)
    assert f["ln_ppl_ratio"] == {"value": 0.0, "stderr": 0.0}
    assert result.perplexity.ppl == result.base_perplexity.ppl


# --- per-token definitions on hand-built tensors ---------------------------------------------------------


@pytest.mark.parametrize("vocab", [2, 64, 4096])
def test_kl_equals_a_double_precision_computation(vocab):
    p, q = random_logprobs(50, vocab, seed=0), random_logprobs(50, vocab, seed=1)
    expected = (p.double().exp() * (p.double() - q.double())).sum(-1)
    assert torch.allclose(kl_divergence(p, q).double(), expected, rtol=1e-4, atol=1e-6)
    assert (kl_divergence(p, p) == 0).all()


def test_top1_top5_and_delta_p_on_a_constructed_example():
    # token 0: same argmax (3), top-5 {3,2,1,0,4} vs {3,2,1,0,5}: overlap 4/5; the target 2 gains 0.1
    # token 1: argmax 0 vs 7, top-5 {0..4} vs {7,6,5,4,3}: overlap 2/5; the target 7 gains 0.45
    base_p = torch.tensor([[0.1, 0.15, 0.2, 0.4, 0.08, 0.03, 0.02, 0.02],
                           [0.3, 0.2, 0.15, 0.12, 0.1, 0.06, 0.04, 0.03]], dtype=torch.float64)
    model_p = torch.tensor([[0.1, 0.12, 0.3, 0.35, 0.02, 0.05, 0.03, 0.03],
                            [0.01, 0.01, 0.01, 0.05, 0.06, 0.1, 0.28, 0.48]], dtype=torch.float64)
    targets = torch.tensor([2, 7])
    tokens = compare_tokens(base_p.log(), model_p.log(), targets)
    assert tokens["same_top1"].tolist() == [1.0, 0.0]
    assert tokens["top5_overlap"].tolist() == pytest.approx([0.8, 0.4])
    assert tokens["delta_p"].tolist() == pytest.approx([0.1, 0.45])
    assert tokens["base_nll"].tolist() == pytest.approx([-math.log(0.2), -math.log(0.03)])
    assert tokens["nll"].tolist() == pytest.approx([-math.log(0.3), -math.log(0.48)])
    assert tokens["kl"].tolist() == pytest.approx((base_p * (base_p / model_p).log()).sum(-1).tolist())


# --- TopK: the bucketed KL is a lower bound --------------------------------------------------------------


@pytest.mark.parametrize("k", [5, 16, 100])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bucketed_kl_is_a_lower_bound(k, seed):
    p, q = random_logprobs(200, 512, seed), random_logprobs(200, 512, seed + 10)
    targets = torch.randint(0, 512, (200,), generator=torch.Generator().manual_seed(seed))
    full, bucketed = kl_divergence(p, q), kl_divergence(compress(p, targets, k), q)
    assert (bucketed <= full + 1e-5).all()  # per token (log-sum inequality), up to fp32 rounding
    assert bucketed.mean() < full.mean()  # random distributions keep real mass in the tail


def test_bucketed_kl_with_the_whole_vocabulary_is_exact():
    p, q = random_logprobs(100, 64, 3), random_logprobs(100, 64, 4)
    top = compress(p, torch.zeros(100, dtype=torch.long), 64)
    assert torch.isneginf(top.rest_logmass).all()  # nothing left outside: the nan of 0 * -inf must not leak
    assert torch.allclose(kl_divergence(top, q), kl_divergence(p, q), rtol=1e-5, atol=1e-7)


def test_topk_keeps_top1_top5_delta_p_and_nll_exact():
    p, q = random_logprobs(100, 256, 5), random_logprobs(100, 256, 6)
    targets = torch.randint(0, 256, (100,), generator=torch.Generator().manual_seed(0))
    full, bucketed = compare_tokens(p, q, targets), compare_tokens(compress(p, targets, 5), q, targets)
    for key in ("same_top1", "top5_overlap", "delta_p", "base_nll", "nll"):
        assert torch.equal(full[key], bucketed[key]), key


def test_compress_keeps_the_rest_mass():
    p = random_logprobs(20, 100, 7)
    top = compress(p, torch.zeros(20, dtype=torch.long), 10)
    assert isinstance(top, TopK) and top.k == 10
    assert (top.logprobs[:, :-1] >= top.logprobs[:, 1:]).all()  # descending
    total = top.logprobs.double().exp().sum(-1) + top.rest_logmass.double().exp()
    assert torch.allclose(total, torch.ones(20, dtype=torch.float64), atol=1e-5)


# --- the summary: schema keys and llama.cpp's statistics -------------------------------------------------


def test_summary_has_every_key_of_the_schema(result):
    f = result.fidelity
    assert set(f) == {"source", "top_k", "kl", "top1", "top5_overlap", "delta_p", "nll_correlation", "ln_ppl_ratio",
                      "kl_histogram"}
    assert set(f["kl"]) == set(KL_KEYS) and set(f["delta_p"]) == set(DELTA_P_KEYS)
    assert set(f["top1"]) == {"agreement", "stderr"} and set(f["ln_ppl_ratio"]) == {"value", "stderr"}


def test_percentiles_are_monotone(result):
    kl, dp = result.fidelity["kl"], result.fidelity["delta_p"]
    kl_order = ["max", *KL_PERCENTILES, "min"]
    dp_order = ["max", *DP_PERCENTILES, "min"]
    assert [kl[k] for k in kl_order] == sorted((kl[k] for k in kl_order), reverse=True)
    assert [dp[k] for k in dp_order] == sorted((dp[k] for k in dp_order), reverse=True)
    assert kl["min"] >= 0 and kl["median"] > 0  # a perturbed model: most tokens move


def test_summary_equals_direct_computation(result, base, data):
    """Every statistic against numpy on per-token values computed independently in double precision."""
    direct = direct_tokens(perturbed(base, 0.3), base, data)
    f, n = result.fidelity, data.n_tokens
    assert len(direct["kl"]) == n == result.perplexity.n_tokens
    assert f["kl"]["mean"] == pytest.approx(direct["kl"].mean(), rel=1e-4)
    assert f["kl"]["stderr"] == pytest.approx(llama_cpp_stderr(direct["kl"]), rel=1e-3)
    assert f["kl"]["p99"] == pytest.approx(np.percentile(direct["kl"], 99), rel=1e-3)
    same = direct["same"].mean()
    assert 0.3 < same < 1  # the perturbation changes some argmaxes, so the stderr below is not trivially 0
    assert f["top1"]["agreement"] == pytest.approx(same, abs=1e-12)
    assert f["top1"]["stderr"] == pytest.approx(math.sqrt(same * (1 - same) / (n - 1)), rel=1e-9)
    assert f["top5_overlap"] == pytest.approx(direct["top5"].mean(), abs=1e-6)  # per-token fifths are fp32
    assert f["delta_p"]["mean"] == pytest.approx(direct["dp"].mean(), abs=1e-6)
    assert f["delta_p"]["stderr"] == pytest.approx(llama_cpp_stderr(direct["dp"]), rel=1e-4)
    assert f["delta_p"]["rms"] == pytest.approx(math.sqrt((direct["dp"] ** 2).mean()), rel=1e-5)
    # delta method: stderr(sqrt(m)) = stderr(m) / (2 sqrt(m))
    assert f["delta_p"]["rms_stderr"] == pytest.approx(
        llama_cpp_stderr(direct["dp"] ** 2) / (2 * math.sqrt((direct["dp"] ** 2).mean())), rel=1e-4)
    assert f["nll_correlation"] == pytest.approx(np.corrcoef(direct["base_nll"], direct["nll"])[0, 1], abs=1e-6)
    ln_ratio = direct["nll"] - direct["base_nll"]
    assert f["ln_ppl_ratio"]["value"] == pytest.approx(ln_ratio.mean(), abs=1e-6)
    assert f["ln_ppl_ratio"]["stderr"] == pytest.approx(llama_cpp_stderr(ln_ratio), rel=1e-4)


def test_pearson_of_related_values():
    x = torch.arange(10, dtype=torch.float64)
    assert pearson(x, 2 * x + 1) == pytest.approx(1.0) and pearson(x, -x) == pytest.approx(-1.0)
    assert pearson(torch.ones(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)) == 1.0  # defined as 1


def test_pearson_never_leaves_minus_one_to_one():
    vectors = [10 * torch.rand(500, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
               for seed in range(100)]
    assert max(pearson(x, x) for x in vectors) <= 1.0


def test_ln_ppl_ratio_is_the_log_of_the_perplexity_ratio(result):
    ratio = math.log(result.perplexity.ppl / result.base_perplexity.ppl)
    assert result.fidelity["ln_ppl_ratio"]["value"] == pytest.approx(ratio, rel=1e-9)


def test_histogram_counts_every_token(result, data):
    hist = result.fidelity["kl_histogram"]
    assert sum(hist["counts"]) == data.n_tokens
    assert len(hist["edges"]) == len(hist["counts"]) + 1
    assert hist["edges"] == sorted(hist["edges"])


def test_histogram_keeps_zero_and_huge_kl_in_the_end_bins():
    acc = FidelityAccumulator()
    acc.add({"kl": torch.tensor([0.0, 1e-12, 0.5, 1e6]), "same_top1": torch.ones(4), "top5_overlap": torch.ones(4),
             "delta_p": torch.zeros(4), "base_nll": torch.arange(4.0), "nll": torch.arange(4.0)})
    counts = acc.summary("in-memory")["kl_histogram"]["counts"]
    assert counts[0] == 2 and counts[-1] == 1 and sum(counts) == 4


@pytest.mark.parametrize("with_base", [False, True])
def test_perplexity_stderr_is_ppl_times_nll_stderr(base, data, with_base):
    model = perturbed(base, 0.3)
    result = evaluate(model, data, base=base if with_base else None, progress=False)
    ppl = result.perplexity
    assert ppl.nll_stderr > 0
    assert ppl.ppl_stderr == pytest.approx(ppl.ppl * ppl.nll_stderr, rel=1e-12)
    assert ppl.ppl == pytest.approx(math.exp(ppl.nll), rel=1e-12)
    assert (result.base_perplexity is not None) == with_base
    assert result.fidelity is None if not with_base else result.fidelity["kl"]["mean"] > 0
