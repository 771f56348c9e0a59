"""The native Llama against transformers' LlamaForCausalLM, generation, padding and pretraining_tp."""

import pytest
import torch
import torch.nn.functional as F
import transformers

from quantkit.errors import QuantkitError
from quantkit.model import LlamaForCausalLM, SamplingConfig, generate
from tests.conftest import SHARED_MODEL, random_model, tiny_config

VOCAB = 512
CONFIGS = {
    "mha": dict(num_key_value_heads=4),
    "gqa": dict(num_key_value_heads=2),
    "mqa-tied": dict(num_key_value_heads=1, tie_word_embeddings=True),
    "rope-linear": dict(rope_type="linear", rope_factor=2.0, rope_theta=5e5),
    "rope-dynamic": dict(rope_type="dynamic", rope_factor=2.0, max_position_embeddings=16),
    "head-dim-32": dict(num_attention_heads=2, num_key_value_heads=1, head_dim=32, hidden_size=96),
}


def pair(name, seed=0):
    """(ours, transformers') with the same random weights, fp32."""
    ours = random_model(tiny_config(vocab_size=VOCAB, **CONFIGS[name]), seed)
    hf_cfg = transformers.LlamaConfig(**ours.config.to_hf_dict())
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return ours, hf


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(name):
    ours, hf = pair(name)
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))  # 40 > 16: dynamic rope grows
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["mha", "gqa", "rope-dynamic"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generation_matches_transformers(name, use_cache):
    ours, hf = pair(name)
    prompt = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = hf.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None,
                           attention_mask=torch.ones_like(prompt))[0, 7:].tolist()
    got = generate(ours, [prompt[0].tolist()], SamplingConfig(max_new_tokens=20), use_cache=use_cache)[0]
    assert got == want


def test_cache_and_no_cache_agree_on_a_batch():
    model = random_model(tiny_config(vocab_size=VOCAB))
    prompts = [[5, 9, 200, 7], [11, 3], [400, 401, 402, 403, 404, 405]]
    sampling = SamplingConfig(max_new_tokens=12)
    assert generate(model, prompts, sampling, use_cache=True) == generate(model, prompts, sampling, use_cache=False)


def test_left_padded_batch_equals_unpadded_sequences():
    model = random_model(tiny_config(vocab_size=VOCAB))
    seqs = [[5, 9, 200, 7, 8, 1, 2], [11, 3], [400, 401, 402, 403]]
    width = max(map(len, seqs))
    ids = torch.tensor([[0] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    with torch.no_grad():
        batched = model(ids, mask)
        assert not batched.isnan().any()
        for row, s in enumerate(seqs):
            alone = model(torch.tensor([s]))[0]
            torch.testing.assert_close(batched[row, width - len(s):], alone, atol=1e-5, rtol=0)
    singles = [generate(model, [s], SamplingConfig(max_new_tokens=8))[0] for s in seqs]
    assert generate(model, seqs, SamplingConfig(max_new_tokens=8)) == singles


def test_sampling_is_seeded_and_respects_top_p():
    model = random_model(tiny_config(vocab_size=VOCAB))
    s = dict(max_new_tokens=10, temperature=1.0)
    a = generate(model, [[5, 6]], SamplingConfig(**s, seed=3))
    assert a == generate(model, [[5, 6]], SamplingConfig(**s, seed=3))
    assert a != generate(model, [[5, 6]], SamplingConfig(**s, seed=4))
    # A tiny top_p keeps only the most likely token: sampling becomes greedy.
    assert generate(model, [[5, 6]], SamplingConfig(max_new_tokens=10, temperature=1.0, top_p=1e-6, seed=5)) == \
        generate(model, [[5, 6]], SamplingConfig(max_new_tokens=10))


def test_generation_stops_at_eos():
    model = random_model(tiny_config(vocab_size=VOCAB))
    first = generate(model, [[5, 6]], SamplingConfig(max_new_tokens=5))[0]
    assert generate(model, [[5, 6]], SamplingConfig(max_new_tokens=5), eos_id=first[1])[0] == first[:2]


# -- pretraining_tp --------------------------------------------------------------------------------

@pytest.mark.parametrize("tp", [2, 4])
def test_pretraining_tp_agrees_with_tp1(tp):
    model = random_model(tiny_config(vocab_size=VOCAB))
    ids = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        base = model(ids)
        model.set_pretraining_tp(tp)
        torch.testing.assert_close(model(ids), base, atol=1e-5, rtol=1e-5)
        model.set_pretraining_tp(1)
        assert torch.equal(model(ids), base)  # switched at run time, no reload


def transformers4_mlp(mlp, x, tp):
    """transformers 4.x LlamaMLP.forward for pretraining_tp > 1, verbatim in substance."""
    slice = mlp.gate_proj.weight.shape[0] // tp
    gate_proj_slices = mlp.gate_proj.weight.split(slice, dim=0)
    up_proj_slices = mlp.up_proj.weight.split(slice, dim=0)
    down_proj_slices = mlp.down_proj.weight.split(slice, dim=1)
    gate_proj = torch.cat([F.linear(x, gate_proj_slices[i]) for i in range(tp)], dim=-1)
    up_proj = torch.cat([F.linear(x, up_proj_slices[i]) for i in range(tp)], dim=-1)
    intermediate_states = (F.silu(gate_proj) * up_proj).split(slice, dim=2)
    down_proj = [F.linear(intermediate_states[i], down_proj_slices[i]) for i in range(tp)]
    return sum(down_proj)


def transformers4_o_proj(attn, y, tp):
    hidden = attn.o_proj.weight.shape[0]
    y = y.split(hidden // tp, dim=2)
    o_proj_slices = attn.o_proj.weight.split(hidden // tp, dim=1)
    return sum([F.linear(y[i], o_proj_slices[i]) for i in range(tp)])


def transformers4_lm_head(lm_head, h, tp):
    slices = lm_head.weight.split(lm_head.weight.shape[0] // tp, dim=0)
    return torch.cat([F.linear(h, slices[i]) for i in range(tp)], dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tp", [2, 4])
def test_pretraining_tp_sums_in_transformers4_order(tp, dtype):
    from quantkit.model.llama import linear_split_cols, linear_split_rows

    model = random_model(tiny_config(vocab_size=VOCAB, hidden_size=128, intermediate_size=512)).to(dtype)
    model.set_pretraining_tp(tp)
    layer = model.model.layers[0]
    x = torch.randn(2, 16, 128, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(layer.mlp(x), transformers4_mlp(layer.mlp, x, tp))
        assert torch.equal(linear_split_cols(x, layer.self_attn.o_proj, tp), transformers4_o_proj(layer.self_attn, x, tp))
        assert torch.equal(linear_split_rows(x, model.lm_head, tp), transformers4_lm_head(model.lm_head, x, tp))
        if dtype == torch.bfloat16:  # the sliced sums round differently from one matmul: that is the point
            h = x.repeat(1, 1, 4)  # (B, T, intermediate)
            assert not torch.equal(layer.mlp.down_proj(h), linear_split_cols(h, layer.mlp.down_proj, tp))


def test_pretraining_tp_must_divide_the_shapes():
    model = random_model(tiny_config(vocab_size=VOCAB, intermediate_size=96))
    with pytest.raises(QuantkitError, match="pretraining_tp=64 does not divide.*intermediate_size=96"):
        model.set_pretraining_tp(64)


def test_meta_construction_allocates_nothing():
    with torch.device("meta"):
        model = LlamaForCausalLM(tiny_config())
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.skipif(not SHARED_MODEL.is_dir(), reason="../shared/models/tiny-llama2-mha is not present")
def test_matches_transformers_on_the_shared_checkpoint():
    """A checkpoint written by transformers 5 (its config dialect, its save_pretrained), both loaders."""
    import quantkit

    ours = quantkit.load(SHARED_MODEL, dtype="fp32")
    hf = transformers.LlamaForCausalLM.from_pretrained(SHARED_MODEL, dtype=torch.float32).eval()
    tok = quantkit.load_tokenizer(SHARED_MODEL)
    ids = torch.tensor([tok.encode((SHARED_MODEL / "test.txt").read_text()[:3000])[:256]])
    with torch.no_grad():
        diff = (ours(ids) - hf(ids).logits).abs().max().item()
        assert diff < 1e-4
        prompt = torch.tensor([tok.encode("The list type")])
        want = hf.generate(prompt, max_new_tokens=32, do_sample=False, attention_mask=torch.ones_like(prompt),
                           pad_token_id=0)[0, prompt.shape[1]:].tolist()
    got = generate(ours, [prompt[0].tolist()], SamplingConfig(max_new_tokens=32), eos_id=tok.eos_id)[0]
    assert got == want[: len(got)] and len(got) == len(want)
