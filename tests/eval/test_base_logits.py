"""Saved base logits (.qkl): agreement with the in-memory comparison, the encodings, the file, and its checks."""

from __future__ import annotations

import copy
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import quantkit
from quantkit.eval import BaseLogits, MemoryBaseLogits, evaluate, save_base_logits, text_data
from quantkit.eval.base_logits import FORMAT, U16_LEVELS, decode, encode
from quantkit.eval.fidelity import TopK
from quantkit.backends.int4 import Int4Config
from quantkit.backends.rtn import RTNConfig
from quantkit.errors import QuantkitError
from quantkit.io.files import Terminated
from tests.conftest import DEMO_MODEL, peaked_model

TEXT = (DEMO_MODEL / "test.txt").read_text(encoding="utf-8")[:2500]  # 12 windows of 64: 756 scored tokens
SEQ_LEN = 64
METADATA_KEYS = {"format", "version", "encoding", "top_k", "vocab_size", "tokenizer", "dataset", "model"}


@pytest.fixture(scope="module")
def tok(tokenizer_file):
    return quantkit.load_tokenizer(tokenizer_file)


@pytest.fixture(scope="module")
def data(tok):
    return text_data(tok, TEXT, SEQ_LEN)


@pytest.fixture(scope="module")
def base():
    return peaked_model()


@pytest.fixture(scope="module", params=["int4", "rtn"])
def quantized(request, base):
    config = Int4Config(group_size=32) if request.param == "int4" else RTNConfig(bits=3, group_size=32)
    return quantkit.quantize(copy.deepcopy(base), config)


@pytest.fixture(scope="module")
def saved(base, tok, data, tmp_path_factory):
    """{encoding: path} of the base's logits saved in each encoding."""
    out = tmp_path_factory.mktemp("qkl")
    return {"uint16": save_base_logits(base, tok, data, out / "base.qkl", progress=False),
            "topk": save_base_logits(base, tok, data, out / "base16.qkl", top_k=16, batch_size=3, progress=False)}


def opened(path, data, tok):
    logits = BaseLogits(path)
    logits.check_matches(data, 4096, tok)
    return logits


# --- saved logits agree with the in-memory base ----------------------------------------------------------


def test_uint16_agrees_with_in_memory(quantized, base, data, saved, tok):
    memory = evaluate(quantized, data, base=base, progress=False)
    saved_run = evaluate(quantized, data, base=opened(saved["uint16"], data, tok), progress=False)
    m, s = memory.fidelity, saved_run.fidelity
    assert s["source"] == "base-logits" and s["top_k"] is None
    # measured (this model, 756 tokens): int4 KL 6.35e-4, relative change 3.3e-7; rtn w3 KL 2.67e-3, 1.7e-6
    assert m["kl"]["mean"] > 1e-4
    assert s["kl"]["mean"] == pytest.approx(m["kl"]["mean"], rel=1e-4)
    assert s["kl"]["p99"] == pytest.approx(m["kl"]["p99"], rel=1e-3)  # measured: 1.8e-4 (int4), 3.9e-5 (rtn)
    # the exact target log-probs are stored: perplexities, delta-p and NLLs do not move
    assert saved_run.perplexity.ppl == memory.perplexity.ppl
    assert saved_run.base_perplexity.ppl == pytest.approx(memory.base_perplexity.ppl, rel=1e-6)
    assert s["nll_correlation"] == pytest.approx(m["nll_correlation"], abs=1e-6)
    assert s["ln_ppl_ratio"]["value"] == pytest.approx(m["ln_ppl_ratio"]["value"], abs=1e-6)
    for key in ("mean", "rms", "p1", "p99"):
        assert s["delta_p"][key] == pytest.approx(m["delta_p"][key], abs=1e-6)
    # top-1/top-5 of the base come from rounded log-probs: a near-tie (gap < one 16-bit step, ~3e-4 nats)
    # can flip. None does on this model; on flatter ones one token in ~750 did.
    n = data.n_tokens
    assert abs(s["top1"]["agreement"] - m["top1"]["agreement"]) <= 1 / n
    assert abs(s["top5_overlap"] - m["top5_overlap"]) <= 1 / n


def test_topk_is_a_lower_bound_with_exact_top1_and_perplexity(quantized, base, data, saved, tok):
    memory = evaluate(quantized, data, base=base, progress=False)
    topk_run = evaluate(quantized, data, base=opened(saved["topk"], data, tok), progress=False)
    m, t = memory.fidelity, topk_run.fidelity
    assert t["source"] == "base-logits" and t["top_k"] == 16
    assert 0 < t["kl"]["mean"] <= m["kl"]["mean"]
    assert t["top1"] == m["top1"]
    assert t["top5_overlap"] == m["top5_overlap"]
    assert topk_run.perplexity.ppl == memory.perplexity.ppl
    assert topk_run.base_perplexity.ppl == pytest.approx(memory.base_perplexity.ppl, rel=1e-6)
    assert t["delta_p"]["mean"] == pytest.approx(m["delta_p"]["mean"], abs=1e-7)


@pytest.mark.parametrize("top_k", [None, 16])
def test_memory_base_logits_equal_the_file(quantized, base, data, saved, tok, top_k):
    in_file = evaluate(quantized, data, base=opened(saved["topk" if top_k else "uint16"], data, tok), progress=False)
    in_memory = evaluate(quantized, data, base=MemoryBaseLogits(base, data, top_k, progress=False), progress=False)
    assert in_memory.fidelity == in_file.fidelity


# --- the encodings ---------------------------------------------------------------------------------------


def test_uint16_round_trip_error_is_half_a_step():
    logprobs = torch.log_softmax(8 * torch.randn(40, 4096, generator=torch.Generator().manual_seed(0)), -1)
    targets = torch.randint(0, 4096, (40,), generator=torch.Generator().manual_seed(1))
    tensors = encode(logprobs, targets)
    assert tensors["logprobs"].dtype == torch.int16 and tensors["logprobs"].shape == logprobs.shape
    low, scale = tensors["logprob_min"][:, None], tensors["logprob_scale"][:, None]
    tiny = 4 * torch.finfo(torch.float32).eps * low.abs()  # fp32 arithmetic on values up to |low|
    dequantized = low + (tensors["logprobs"].float() + 32768) * scale
    assert ((dequantized - logprobs).abs() <= scale / 2 + tiny).all()
    # decode renormalises (a shift by a p-weighted mean of the rounding errors, so at most scale / 2 more)
    decoded = decode(tensors)
    error = (decoded - logprobs).abs()
    assert (error <= scale + tiny).all()
    assert error.max() > 0  # the test would notice an encoding that stored nothing
    assert torch.equal(decoded.gather(-1, targets[:, None]).squeeze(-1), logprobs.gather(-1, targets[:, None])[:, 0])


def test_uint16_saturates_minus_infinity():
    logprobs = torch.log_softmax(torch.tensor([[0.0, 1.0, float("-inf"), 2.0]]), -1)
    decoded = decode(encode(logprobs, torch.tensor([1])))
    assert torch.isfinite(decoded).all() and decoded[0, 2] <= -1e4 + 1
    assert torch.allclose(decoded[0, [0, 1, 3]], logprobs[0, [0, 1, 3]], atol=1e4 / U16_LEVELS)


def test_topk_encoding_decodes_to_a_topk():
    logprobs = torch.log_softmax(torch.randn(5, 100, generator=torch.Generator().manual_seed(0)), -1)
    targets = torch.arange(5)
    top = decode(encode(logprobs, targets, top_k=8))
    assert isinstance(top, TopK) and top.k == 8
    assert torch.equal(top.logprobs, logprobs.topk(8).values) and torch.equal(top.ids, logprobs.topk(8).indices)
    assert torch.equal(top.target_logprob, logprobs[torch.arange(5), targets])


# --- the file ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["uint16", "topk"])
def test_file_is_safetensors_with_the_metadata(saved, data, tok, encoding):
    with safe_open(str(saved[encoding]), framework="pt") as f:
        metadata, keys = f.metadata(), set(f.keys())
        window0 = {k[2:]: f.get_tensor(k) for k in keys if k.startswith("0.")}
    assert METADATA_KEYS <= set(metadata)
    assert metadata["format"] == FORMAT and metadata["encoding"] == encoding
    assert metadata["top_k"] == ("16" if encoding == "topk" else "0") and metadata["vocab_size"] == "4096"
    assert metadata["tokenizer"] == tok.fingerprint()
    assert json.loads(metadata["dataset"]) == data.describe()
    n = data.windows[0].n_scored
    names = {"logprobs": (n, 4096), "logprob_min": (n,), "logprob_scale": (n,)} if encoding == "uint16" else \
        {"topk_logprobs": (n, 16), "topk_ids": (n, 16), "rest_logmass": (n,)}
    assert {k: tuple(v.shape) for k, v in window0.items()} == {**names, "target_logprob": (n,), "targets": (n,)}
    assert keys == {f"{w.start}.{name}" for w in data.windows for name in window0}  # named by first token
    assert torch.equal(window0["targets"].long(), data.targets(data.windows[0]))


def test_model_info_is_kept(base, tok, data, tmp_path):
    info = {"name": "base", "method": "fp32", "size_bytes": 123}
    path = save_base_logits(base, tok, data, tmp_path / "b.qkl", progress=False, model_info=info)
    assert BaseLogits(path).model_info == info


def test_write_leaves_only_the_file(saved):
    assert sorted(p.name for p in saved["uint16"].parent.iterdir()) == ["base.qkl", "base16.qkl"]


@pytest.mark.parametrize("existing", [False, True])
@pytest.mark.parametrize("failure", ["error", "sigterm"])
def test_failed_write_leaves_nothing(base, tok, data, tmp_path, monkeypatch, failure, existing):
    """A run that fails half-way (out of memory, ctrl-c, kill) must not leave a file that looks complete."""
    model, calls = copy.deepcopy(base), []
    forward, handler = model.forward, signal.getsignal(signal.SIGTERM)
    if existing:
        (tmp_path / "base.qkl").write_bytes(b"an earlier run's file")

    def failing_forward(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            if failure == "error":
                raise RuntimeError("out of memory (simulated)")
            # what `kill` does; save_base_logits turns it into Terminated (were it not, this would end pytest)
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None)
            os.kill(os.getpid(), signal.SIGTERM)
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", failing_forward)
    with pytest.raises(RuntimeError, match="simulated") if failure == "error" else pytest.raises(Terminated):
        save_base_logits(model, tok, data, tmp_path / "base.qkl", progress=False)
    assert len(calls) == 3  # it failed mid-way, after two windows were written
    # neither a new base.qkl nor a temporary (.base.qkl.*.tmp) nor a scratch directory (.base.qkl.*)
    assert [p.name for p in tmp_path.iterdir()] == (["base.qkl"] if existing else [])
    if existing:
        assert (tmp_path / "base.qkl").read_bytes() == b"an earlier run's file"
    assert signal.getsignal(signal.SIGTERM) is handler  # restored


def test_save_into_a_missing_directory(base, tok, data, tmp_path):
    with pytest.raises(QuantkitError, match="no such file or directory.*create the directory first"):
        save_base_logits(base, tok, data, tmp_path / "missing" / "b.qkl", progress=False)


@pytest.mark.parametrize("top_k", [1, 4])
def test_top_k_below_five(base, tok, data, tmp_path, top_k):
    with pytest.raises(QuantkitError, match=f"--top-k {top_k}: top-5 overlap needs at least 5"):
        save_base_logits(base, tok, data, tmp_path / "b.qkl", top_k=top_k, progress=False)
    assert list(tmp_path.iterdir()) == []


# --- refused files ---------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nothing.qkl"
    with pytest.raises(QuantkitError, match="--save-logits") as e:
        BaseLogits(path)
    assert str(path) in str(e.value)


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "junk.qkl"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00this is not a header")
    with pytest.raises(QuantkitError, match="not a base-logits file"):
        BaseLogits(path)


@pytest.mark.parametrize("metadata,message", [(None, "not quantkit base logits"),
                                              ({"format": "pt"}, "not quantkit base logits"),
                                              ({"format": FORMAT, "version": "0"}, "base-logits version 0")])
def test_a_safetensors_file_that_is_not_quantkits(tmp_path, metadata, message):
    path = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(path), metadata=metadata)
    with pytest.raises(QuantkitError, match=message):
        BaseLogits(path)


@pytest.mark.parametrize("other", [dict(text=TEXT[:2000]), dict(seq_len=32), dict(stride=32)])
def test_logits_of_another_dataset(saved, tok, other):
    args = {"text": TEXT, "seq_len": SEQ_LEN, **other}
    with pytest.raises(QuantkitError, match="made from dataset") as e:
        opened(saved["uint16"], text_data(tok, args.pop("text"), **args), tok)
    assert "--seq-len" in str(e.value)


def test_another_vocabulary(saved, data, tok):
    with pytest.raises(QuantkitError, match="vocabulary of 4096, the evaluated model has 32000"):
        BaseLogits(saved["uint16"]).check_matches(data, 32000, tok)


def test_another_tokenizer(saved, data, tokenizer_file, monkeypatch):
    other = quantkit.load_tokenizer(tokenizer_file)
    monkeypatch.setattr(other, "fingerprint", lambda: "0" * 32)  # another tokenizer.model with the same vocab size
    with pytest.raises(QuantkitError, match="another tokenizer"):
        BaseLogits(saved["uint16"]).check_matches(data, 4096, other)


def test_base_logits_used_as_documented(saved, base, data):
    # should either work (index the windows on first use) or raise a QuantkitError saying to call check_matches
    result = evaluate(base, data, base=BaseLogits(saved["uint16"]), progress=False)
    assert result.fidelity["kl"]["mean"] < 1e-6


def test_saved_logits_path_may_be_a_string(saved, data, tok):
    assert opened(str(saved["uint16"]), data, tok).path == Path(saved["uint16"])


def test_saving_gives_the_perplexity_without_a_second_pass(base, tok, data, tmp_path, monkeypatch):
    """run_eval --save-logits reads the perplexity back from the file's exact target log-probs."""
    from quantkit.eval.compare import EvalOptions, run_eval
    from quantkit.model import save_model

    save_model(base, tmp_path / "m", tokenizer_dir=DEMO_MODEL)
    expected = run_eval(tmp_path / "m", data, options=EvalOptions(speed=False, progress=False))
    calls = []
    monkeypatch.setattr("quantkit.eval.compare.evaluate", lambda *a, **k: calls.append(a))
    saved = run_eval(tmp_path / "m", data, save_logits=tmp_path / "m.qkl", options=EvalOptions(speed=False, progress=False))
    assert calls == [] and (tmp_path / "m.qkl").is_file()
    assert saved["models"][0]["perplexity"] == pytest.approx(expected["models"][0]["perplexity"], rel=1e-6)
