"""pretraining_tp on quantized models: AffineLinear.split, the sliced forward through its parts, and the errors."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quantkit
from quantkit.backends.bnb import BnbNF4Config
from quantkit.backends.gptq import GPTQConfig
from quantkit.backends.int4 import Int4Config
from quantkit.backends.rtn import RTNConfig
from quantkit.run.calibrator import quantize_calibrated
from quantkit.errors import QuantkitError
from quantkit.model.llama import linear_split_cols, linear_split_rows
from quantkit.quant.linear import AffineLinear, int4_kernels
from tests.conftest import random_model, tiny_config

VOCAB = 256
# hidden 128 and intermediate 256: tp=4 column slices of 32 and 64 hold whole groups of 32. One key/value
# head: k/v_proj have 32 rows, so at tp=4 their int4 parts (8 rows) fall back from tinygemm to dequantize.
SHAPES = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=1)
TOKENS = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))  # gptq calibration
IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))

RTN = {f"rtn{b}-g{g}-{'sym' if s else 'asym'}": RTNConfig(bits=b, group_size=g, symmetric=s)
       for b in (3, 8) for g in (32, -1) for s in (True, False)}
METHODS = {"int4-g32": Int4Config(group_size=32), **RTN,
           "gptq-act-order-static": GPTQConfig(bits=4, group_size=32, desc_act=True, static_groups=True)}
ACT_ORDER = GPTQConfig(bits=4, group_size=32, desc_act=True)  # g_idx scatters groups: rows only
TPS = [2, 4]


def quantized_model(config, seed: int = 0, **overrides):
    model = random_model(tiny_config(**{**SHAPES, **overrides}), seed)
    if isinstance(config, GPTQConfig):
        quantize_calibrated(model, config, TOKENS, progress=False)
    else:
        quantkit.quantize(model, config)
    return model


def affine_linears(model):
    return [(name, m, dim) for name, m, dim in model.tp_linears() if isinstance(m, AffineLinear)]


def kernel_off(model):
    for _, m, _ in affine_linears(model):
        m.use_int4_kernel = False
    return model


def dequantized_copy(model):
    """The same model with every AffineLinear replaced by an nn.Linear holding its dequantized weight."""
    dense = copy.deepcopy(model)
    for name, m, _ in affine_linears(dense):
        linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(m.dequantize())
            if m.bias is not None:
                linear.bias.copy_(m.bias)
        dense.set_submodule(name, linear)
    return dense


def logits(model, tp):
    model.set_pretraining_tp(tp)
    with torch.no_grad():
        return model(IDS)


# -- (a) split: bit-exact slices of the quantized state ---------------------------------------------

def check_split(m: AffineLinear, tp: int, rows_only: bool = False):
    torch.manual_seed(0)
    w = m.dequantize()  # (N, K) in the model dtype (fp32 here)
    x = torch.randn(2, 5, m.in_features)
    rows = m.split(tp, 0)
    for part, packed in zip(rows, m.weight_packed.chunk(tp, dim=0)):  # bits packed per row: row slices of words
        assert part.bias is None and torch.equal(part.weight_packed, packed)
        part.use_int4_kernel = False
    assert torch.equal(torch.cat([p.dequantize() for p in rows]), w)
    assert torch.equal(torch.cat([p(x) for p in rows], dim=-1), torch.cat([F.linear(x, wi) for wi in w.chunk(tp)], -1))
    if rows_only:
        return
    cols = m.split(tp, 1)
    for part in cols:
        part.use_int4_kernel = False
    assert torch.equal(torch.cat([p.dequantize() for p in cols], dim=1), w)
    partial = [F.linear(xi, wi) for xi, wi in zip(x.chunk(tp, dim=-1), w.chunk(tp, dim=1))]  # as 4.x did
    torch.testing.assert_close(sum(p(xi) for p, xi in zip(cols, x.chunk(tp, dim=-1))), sum(partial),
                               rtol=1e-6, atol=1e-7)  # a contiguous copy of the weight slice: fp32 rounding at most


@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("method", METHODS)
def test_split_parts_are_exact_slices(method, tp):
    for _, m, _ in affine_linears(quantized_model(METHODS[method])):
        check_split(m, tp)


@pytest.mark.parametrize("tp", TPS)
def test_act_order_splits_rows_but_not_columns(tp):
    m = quantized_model(ACT_ORDER).model.layers[0].mlp.down_proj
    assert m.weight_g_idx is not None
    check_split(m, tp, rows_only=True)
    with pytest.raises(QuantkitError, match="act-order groups .* scatter .* static groups"):
        m.split(tp, 1)


def test_per_channel_column_parts_keep_the_row_scale():
    m = quantized_model(RTNConfig(bits=8, group_size=-1)).model.layers[0].mlp.down_proj
    for part in m.split(4, 1):
        assert (part.in_features, part.group_size) == (64, 64)
        assert torch.equal(part.weight_scale, m.weight_scale)  # (N, 1): the whole row's one scale


def test_int4_parts_run_on_the_kernel_where_it_fits():
    attn = quantized_model(Int4Config(group_size=32)).model.layers[0].self_attn
    with int4_kernels(attn):  # an fp32 model computes exactly unless asked
        assert all(p.use_int4_kernel for p in attn.q_proj.split(4, 0) + attn.k_proj.split(2, 0) + attn.o_proj.split(4, 1))
        assert not any(p.use_int4_kernel for p in attn.k_proj.split(4, 0))  # 8 rows: tinygemm wants multiples of 16
        attn.q_proj.use_int4_kernel = False
        assert not any(p.use_int4_kernel for p in attn.q_proj.split(2, 0))  # parts follow the module's choice
        torch.manual_seed(0)
        x = torch.randn(3, 128)
        w = attn.o_proj.dequantize()
        ref = sum(F.linear(xi, wi) for xi, wi in zip(x.chunk(4, dim=-1), w.chunk(4, dim=1)))
        y = linear_split_cols(x, attn.o_proj, 4)
        assert (y - ref).abs().max() <= 1e-2 * ref.abs().max()  # bf16 inside the kernel


# -- (b), (c) the model with tp > 1 ---------------------------------------------------------------

@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("method", METHODS)
def test_quantized_model_with_tp_agrees_with_tp1(method, tp):
    model = kernel_off(quantized_model(METHODS[method]))
    base = logits(model, 1)
    model.set_pretraining_tp(tp)  # builds the parts: spy on them
    calls = []
    for _, m, dim in affine_linears(model):
        for part in m.__dict__["_tp_parts"][(tp, dim)][1]:
            part.register_forward_hook(lambda *args: calls.append(1))
    sliced = logits(model, tp)
    assert len(calls) == tp * len(affine_linears(model))  # every part ran once
    torch.testing.assert_close(sliced, base, rtol=0, atol=1e-4 * base.abs().max().item())
    assert torch.equal(logits(model, 1), base)  # and back, no reload


@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("method", METHODS)
def test_quantized_model_with_tp_equals_its_dequantized_copy(method, tp):
    model = kernel_off(quantized_model(METHODS[method]))
    dense = dequantized_copy(model)
    assert not affine_linears(dense)
    torch.testing.assert_close(logits(model, tp), logits(dense, tp), rtol=1e-6, atol=1e-6)  # bit-equal here


@pytest.mark.parametrize("tp", TPS)
def test_int4_kernel_with_tp_agrees_with_tp1(tp):
    model = quantized_model(Int4Config(group_size=32))
    base = logits(model, 1)
    # bf16 activations and bf16 partial products in the kernel: 1.8e-4 (tp=2) and 2.5e-4 (tp=4) measured,
    # the size of the kernel's own difference from fp32 dequantize+matmul at tp=1
    assert (logits(model, tp) - base).abs().max() <= 2e-3 * base.abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int4_kernel_column_parts_take_strided_inputs(dtype):
    """Column parts get x.chunk(tp, -1) views; in bf16 no cast copies them, and the CPU kernel needs contiguous rows."""
    model = quantized_model(Int4Config(group_size=32)).to(dtype)
    with int4_kernels(model):  # quantized in fp32, where the modules compute exactly unless asked
        base = logits(model, 1).float()
        assert (logits(model, 2).float() - base).abs().max() <= 2e-2 * base.abs().max()


def test_tied_lm_head_slices_with_a_quantized_model():
    model = kernel_off(quantized_model(Int4Config(group_size=32), tie_word_embeddings=True))
    base = logits(model, 1)
    torch.testing.assert_close(logits(model, 2), base, rtol=0, atol=1e-4 * base.abs().max().item())
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight


def test_parts_are_rebuilt_when_the_weights_change():
    model = kernel_off(quantized_model(RTNConfig(bits=4, group_size=32)))
    other = kernel_off(quantized_model(RTNConfig(bits=4, group_size=32), seed=1))
    logits(model, 2)
    model.load_state_dict(other.state_dict())  # in place: same storage, new values
    torch.testing.assert_close(logits(model, 2), logits(other, 2), rtol=0, atol=0)


# -- (d) errors -------------------------------------------------------------------------------------

def test_bitsandbytes_cannot_be_sliced():
    model = quantized_model(BnbNF4Config())
    with pytest.raises(QuantkitError, match=r"pretraining_tp=2: model\.layers\.0\.self_attn\.q_proj is a "
                                            r"Linear4bit \(bnb-nf4\), which cannot be sliced.*pretraining_tp=1"):
        model.set_pretraining_tp(2)
    assert model.pretraining_tp == 1 and model.model.layers[0].mlp.pretraining_tp == 1
    with pytest.raises(QuantkitError, match="Linear4bit .* cannot be sliced"):  # called directly, too
        linear_split_rows(torch.randn(1, 128), model.model.layers[0].self_attn.q_proj, 2)


def test_column_slices_must_hold_whole_groups():
    # intermediate 128 / tp 4 = 32 columns per down_proj slice, groups of 64; hidden 256 / 4 = 64 is fine.
    model = quantized_model(RTNConfig(bits=4, group_size=64), hidden_size=256, intermediate_size=128)
    tp2 = logits(model, 2)
    with pytest.raises(QuantkitError, match=r"pretraining_tp=4: model\.layers\.0\.mlp\.down_proj: .*group size 64 "
                                            r"does not divide the column slice width 32"):
        model.set_pretraining_tp(4)
    assert model.pretraining_tp == 2 and model.model.layers[1].self_attn.pretraining_tp == 2
    q_proj = model.model.layers[0].self_attn.q_proj
    assert set(q_proj.__dict__["_tp_parts"]) == {(2, 0)}  # the failed tp's parts are not kept
    assert torch.equal(logits(model, 2), tp2)


def test_act_order_model_refuses_column_slices():
    model = quantized_model(ACT_ORDER)
    with pytest.raises(QuantkitError, match=r"pretraining_tp=2: model\.layers\.0\.self_attn\.o_proj: .*act-order"):
        model.set_pretraining_tp(2)
    assert model.pretraining_tp == 1


# -- (e) the parts are not registered ----------------------------------------------------------------

def test_parts_stay_out_of_state_dict_and_named_modules():
    model = quantized_model(Int4Config(group_size=32))
    keys, names = list(model.state_dict()), [n for n, _ in model.named_modules()]
    logits(model, 4)
    assert model.model.layers[0].mlp.down_proj.__dict__["_tp_parts"]  # cached on the module ...
    assert list(model.state_dict()) == keys and [n for n, _ in model.named_modules()] == names  # ... unregistered
    logits(model, 1)
    assert not model.model.layers[0].mlp.down_proj.__dict__["_tp_parts"]  # tp=1 drops them
