"""GGUF blocks (quantkit/formats/gguf.py): quantkit's affine weights in ggml's Q4_0 / Q4_1 / Q8_0 blocks, decoded by
gguf's own dequantizer (llama.cpp's Python package) and compared with quantkit's dequantized weights."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from quantkit.errors import QuantkitError
from quantkit.formats.gguf import gguf_blocks, gguf_type, permute_rows
from quantkit.quant.affine import quantize_weight


def weight(n: int, k: int, bits: int, symmetric: bool, dtype=torch.float16, seed: int = 0):
    torch.manual_seed(seed)
    w = (torch.randn(n, k) * 0.05).to(dtype)
    w[0, 3] = 0.9  # an outlier: a block whose range it stretches
    return quantize_weight(w, bits, 32, symmetric)


def decoded(blocks: np.ndarray, qtype, n: int, k: int) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(blocks, qtype).reshape(n, k).astype(np.float32))


@pytest.mark.parametrize("shape", [(64, 128), (24, 96), (1, 32)])
@pytest.mark.parametrize("bits,symmetric,kind", [(4, True, "Q4_0"), (8, True, "Q8_0")])
def test_symmetric_blocks_decode_to_quantkits_weights_exactly(bits, symmetric, kind, shape):
    w = weight(*shape, bits, symmetric)
    blocks, qtype = gguf_blocks(w)
    assert qtype == getattr(gguf.GGMLQuantizationType, kind)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    assert blocks.dtype == np.uint8 and blocks.shape == (shape[0], shape[1] // block * size)
    got = decoded(blocks, qtype, *shape)
    exact = (w.q.float() - w.zero.float().repeat_interleave(32, dim=1)) * w.scale.float().repeat_interleave(32, dim=1)
    assert torch.equal(got, exact)  # (q - z) s in fp32: exact for fp16 s
    assert torch.equal(got.half(), w.dequantize(torch.float16))  # what quantkit's fp16 model computes with


@pytest.mark.parametrize("shape", [(64, 128), (24, 96)])
def test_asymmetric_4bit_blocks_differ_only_by_the_minimums_fp16_rounding(shape):
    """Q4_1's w = d q + m, m = -s z in fp16: the only change, bounded by half an fp16 step of m."""
    w = weight(*shape, 4, False)
    blocks, qtype = gguf_blocks(w)
    assert qtype == gguf.GGMLQuantizationType.Q4_1
    got = decoded(blocks, qtype, *shape)
    m = (-w.scale.float() * w.zero.float()).repeat_interleave(32, dim=1)
    exact = w.q.float() * w.scale.float().repeat_interleave(32, dim=1) + m
    assert ((got - exact).abs() <= m.abs() * 2.0 ** -11 + 1e-7).all()
    d = w.scale.float().repeat_interleave(32, dim=1)
    q = w.q.float()
    torch.testing.assert_close(got, d * q + m.half().float(), rtol=0, atol=1e-7)  # exactly d q + fp16(m)


def test_fp32_scales_are_rounded_to_fp16():
    w = weight(16, 64, 4, True, dtype=torch.float32)
    blocks, qtype = gguf_blocks(w)
    expected = (w.q.float() - 8) * w.scale.half().float().repeat_interleave(32, dim=1)
    assert torch.equal(decoded(blocks, qtype, 16, 64), expected)


@pytest.mark.parametrize("bits,group_size,symmetric,act_order", [
    (4, 128, True, False), (4, -1, False, False), (3, 32, True, False), (8, 32, False, False), (2, 32, False, False),
    (4, 32, True, True)])
def test_schemes_gguf_cannot_hold_are_refused_in_one_line(bits, group_size, symmetric, act_order):
    with pytest.raises(QuantkitError) as e:
        gguf_type(bits, group_size, symmetric, act_order, name="model.layers.0.mlp.up_proj")
    message = str(e.value)
    assert "\n" not in message and message.startswith("model.layers.0.mlp.up_proj: ")
    assert "--group-size 32" in message and "Q4_0" in message and "--format gguf -o OUT.gguf" in message


def test_act_order_weights_are_refused():
    w = weight(8, 64, 4, True)
    w.g_idx = torch.randperm(64, generator=torch.Generator().manual_seed(0)).int() // 32
    with pytest.raises(QuantkitError, match="act-order"):
        gguf_blocks(w, "q")


@pytest.mark.parametrize("n_head,n_head_kv,rows", [(4, None, 64), (4, 2, 32)])
def test_q_and_k_rows_are_permuted_as_llama_cpps_converter_does(n_head, n_head_kv, rows):
    """Per head of D rows: 0, D/2, 1, D/2 + 1, ... (interleaving transformers' rotary halves)."""
    heads = n_head_kv or n_head
    D = rows // heads
    got = permute_rows(np.arange(rows), n_head, n_head_kv)
    expected = [h * D + j // 2 + (D // 2) * (j % 2) for h in range(heads) for j in range(D)]
    assert got.tolist() == expected
    blocks = np.arange(rows * 18, dtype=np.uint8).reshape(rows, 18)  # whole rows of blocks move
    assert np.array_equal(permute_rows(blocks, n_head, n_head_kv), blocks[got])
