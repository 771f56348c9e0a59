"""Affine qparams: exactly torchao's, and the properties every backend relies on."""

import pytest
import torch
from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine, dequantize_affine, quantize_affine

from quantkit.quant.affine import quantize_weight
from quantkit.errors import QuantkitError


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
def test_int4_asymmetric_is_exactly_torchao(group_size, dtype):
    w = torch.randn(48, 512, dtype=dtype)
    ours = quantize_weight(w, 4, group_size, symmetric=False)
    block = (1, group_size)
    scale, zero = choose_qparams_affine(w, MappingType.ASYMMETRIC, block, torch.uint8, 0, 15,
                                        zero_point_dtype=torch.int32)
    q = quantize_affine(w, block, scale, zero, torch.uint8, 0, 15)
    assert torch.equal(ours.q, q) and torch.equal(ours.zero, zero) and torch.equal(ours.scale, scale)
    assert torch.equal(ours.dequantize(), dequantize_affine(q, block, scale, zero, torch.uint8, 0, 15, output_dtype=dtype))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_rtn_properties(bits, symmetric, group_size):
    w = torch.randn(32, 256)
    a = quantize_weight(w, bits, group_size, symmetric)
    assert a.q.dtype == torch.uint8 and int(a.q.max()) < 2**bits
    assert a.scale.shape == a.zero.shape == (32, 256 // (256 if group_size == -1 else group_size))
    if symmetric:
        assert (a.zero == 2 ** (bits - 1)).all()
    # Round to nearest: every weight within half a step of its grid point (inside the clipping range).
    err = (a.dequantize() - w).abs()
    step = a.scale[:, a.group_index()]
    assert (err <= step / 2 + 1e-6).float().mean() > 0.99
    # More bits, less error.
    if bits < 8:
        assert (quantize_weight(w, 8, group_size, symmetric).dequantize() - w).abs().mean() < err.mean()


def test_group_size_must_divide():
    with pytest.raises(QuantkitError, match="layer.w: group size 96 does not divide in_features=256"):
        quantize_weight(torch.randn(4, 256), 4, 96, False, name="layer.w")


@pytest.mark.parametrize("method", ["int4", "rtn", "bnb-nf4", "bnb-int8"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_names_the_tensor_for_every_backend(bad, method):
    from quantkit.backends import QuantConfig, quantize
    from tests.conftest import random_model, tiny_config

    model = random_model(tiny_config(hidden_size=128, intermediate_size=256))
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[1, 3] = bad
    with pytest.raises(QuantkitError, match="model.layers.0.mlp.up_proj: contains NaN or Inf"):
        quantize(model, QuantConfig.from_dict({"method": method}))
