"""In fp32 quantkit measures the quantization, not its kernel: a 4-bit file's KL equals an independent fp32
dequantization's (issue: the bf16 int4 kernel used to read GPTQ w4g128's KL 3% high)."""

import copy

import pytest
import torch
from safetensors.torch import load_file

import quantkit
from quantkit.backends import quantize
from quantkit.backends.int4 import Int4Config
from quantkit.eval import evaluate
from quantkit.eval.data import windows_of
from quantkit.run.export import save_quantized
from quantkit.model import save_model
from quantkit.quant.linear import int4_kernels
from quantkit.quant.surgery import decoder_linears
from tests.conftest import DEMO_VOCAB, peaked_model
from tests.helpers import decompress_with_compressed_tensors, unpack_columns


def gptq_dequantize_fp32(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """(N, K) fp32 from one module's 4-bit gptq_v2 tensors (asymmetric: z stored), written from the layout alone."""
    g_idx = tensors[f"{name}.g_idx"].long()
    scales = tensors[f"{name}.scales"].float()  # (G, N)
    q = unpack_columns(tensors[f"{name}.qweight"], 4, g_idx.numel())  # (K, N)
    zeros = unpack_columns(tensors[f"{name}.qzeros"].t(), 4, scales.shape[1]).t()  # (G, N)
    return ((q - zeros[g_idx]).float() * scales[g_idx]).t()


def independent(base, path, fmt: str):
    """The base with every decoder linear's weight replaced by the file's, dequantized in fp32 by other code."""
    dense = copy.deepcopy(base)
    if fmt == "gptq":
        tensors = load_file(path / "model.safetensors")
        weights = {name: gptq_dequantize_fp32(tensors, name) for name, _ in decoder_linears(dense)}
    else:
        state = decompress_with_compressed_tensors(path)
        weights = {name: state[f"{name}.weight"].float() for name, _ in decoder_linears(dense)}
    with torch.no_grad():
        for name, linear in decoder_linears(dense):
            linear.weight.copy_(weights[name])
    return dense


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_fp32_kl_of_a_4bit_file_equals_an_independent_dequantization(tmp_path, fmt):
    base = peaked_model(hidden_size=128, intermediate_size=256)
    save_model(base, tmp_path / "base")
    path = save_quantized(quantize(copy.deepcopy(base), Int4Config(32)), tmp_path / "q", format=fmt)
    torch.manual_seed(0)
    data = windows_of("random", torch.randint(3, DEMO_VOCAB, (8 * 64,)), 64)
    model = quantkit.load(path, dtype="fp32")

    def kl(m):
        return evaluate(m, data, base=base, progress=False).fidelity["kl"]["mean"]

    ours, theirs = kl(model), kl(independent(base, path, fmt))
    assert ours == pytest.approx(theirs, rel=1e-3)
    with int4_kernels(model):  # what fp32 measured before: the bf16 kernel's rounding on top of the quantization
        kernel = kl(model)
    assert abs(kernel - theirs) > 10 * abs(ours - theirs)
