"""AffineLinear: the int4 kernel path against dequantize-then-matmul."""

import pytest
import torch

from quantkit.quant.affine import AffineWeight, quantize_weight
from quantkit.quant.linear import AffineLinear, arithmetic, int4_kernels

BF16_TOLERANCE = 1e-2  # relative to max |y|: the int4 kernels compute in bf16 whatever the model dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
@pytest.mark.parametrize("shape", [(64, 256), (256, 512)])
@pytest.mark.parametrize("batch", [1, 16])
def test_int4_kernel_equals_dequantize_matmul(dtype, group_size, shape, batch):
    torch.manual_seed(0)
    w = quantize_weight(torch.randn(shape, dtype=dtype) * 0.02, 4, group_size, symmetric=False)
    m = AffineLinear(w, dtype=dtype)
    assert m.use_int4_kernel == (dtype != torch.float32)  # fp32 computes exactly unless asked
    x = torch.randn(batch, 3, shape[1], dtype=dtype)
    ref = x.float() @ w.dequantize().float().T
    with int4_kernels(m):
        assert m.use_int4_kernel
        y = m(x)
    assert m.use_int4_kernel == (dtype != torch.float32)  # restored
    assert y.dtype == dtype and y.shape == (batch, 3, shape[0])
    assert (y.float() - ref).abs().max() <= BF16_TOLERANCE * ref.abs().max()


def test_act_order_runs_on_the_kernel_by_permuting_the_input():
    torch.manual_seed(0)
    base = quantize_weight(torch.randn(64, 256), 4, 32, symmetric=False)
    perm = torch.randperm(256)
    g_idx = (torch.arange(256) // 32)[perm].int()  # what act-order leaves: groups scattered over columns
    w = AffineWeight(q=base.q[:, perm], scale=base.scale, zero=base.zero, bits=4, group_size=32, symmetric=False,
                     g_idx=g_idx)
    m = AffineLinear(w, dtype=torch.bfloat16)
    assert m.use_int4_kernel
    x = torch.randn(5, 256)
    ref = x @ w.dequantize().T
    assert (m(x.bfloat16()).float() - ref).abs().max() <= BF16_TOLERANCE * ref.abs().max()  # bf16 kernel


def test_fp32_computes_exactly_and_says_so():
    # fp32 measures the quantization, not the bf16 kernel: the same numbers as an fp32 matmul of the dequantized weight
    torch.manual_seed(0)
    w = quantize_weight(torch.randn(64, 256) * 0.02, 4, 128, symmetric=False)
    exact, fast = AffineLinear(w, dtype=torch.float32), AffineLinear(w, dtype=torch.bfloat16)
    fast2 = AffineLinear(w, dtype=torch.bfloat16)
    exact.quant_record = fast.quant_record = fast2.quant_record = object()
    x = torch.randn(7, 256)
    assert torch.equal(exact(x), x @ exact.dequantize().T)
    assert arithmetic(exact) == "dequantized weights, float32 matmul (1 linear)"
    assert arithmetic(torch.nn.Sequential(fast, fast2)) == "int4 tinygemm kernel (bf16 activations) (2 linears)"
    assert arithmetic(torch.nn.Linear(2, 2)) == "dense"
    with int4_kernels(exact):
        assert arithmetic(exact) == "int4 tinygemm kernel (bf16 activations) (1 linear)"
        assert not torch.equal(exact(x), x @ exact.dequantize().T)  # bf16 activations
    with int4_kernels(fast, enabled=False):  # the other way: a bf16 module with dequantized weights (check's floor)
        assert arithmetic(fast) == "dequantized weights, bfloat16 matmul (1 linear)"
    assert fast.use_int4_kernel


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_other_widths_dequantize(bits):
    w = quantize_weight(torch.randn(32, 128), bits, 64, symmetric=True)
    m = AffineLinear(w, bias=torch.randn(32), dtype=torch.float32)
    assert not m.use_int4_kernel
    x = torch.randn(2, 128)
    torch.testing.assert_close(m(x), x @ w.dequantize().T + m.bias)


def test_portable_state_round_trips():
    w = quantize_weight(torch.randn(48, 128), 3, 32, symmetric=False)
    back = AffineLinear(w, dtype=torch.float32).affine_weight()
    assert torch.equal(back.q, w.q) and torch.equal(back.zero, w.zero) and torch.equal(back.scale, w.scale)
