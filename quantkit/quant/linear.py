"""Runtime modules for integer-affine quantized linears (int4, rtn, gptq).

`AffineLinear` holds the portable quantized state as buffers (the compressed-tensors layout:
`weight_packed`, `weight_scale`, `weight_zero_point`, optional `weight_g_idx`) and, for 4 bits,
the kernel layout derived from it at load time: torch's tinygemm int4 kernels on CUDA
(`_weight_int4pack_mm`, as torchao's Int4WeightOnlyConfig) and on CPU
(`_weight_int4pack_mm_for_cpu`). The CPU packed layout depends on the host's vector width, so it is
never saved. Both kernels compute in bf16: on CPU the fp16/fp32 variants of the kernel are 30x
slower (0.46 ms bf16 vs 15-17 ms at 4096x4096, batch 1, on this project's machine), and bf16
activation rounding (2^-9) is small next to 4-bit weight error. Other widths dequantize and
matmul. Act-order runs on the kernels by permuting the input, not the weight.

In fp32 a module computes exactly instead (dequantized fp32 weights, fp32 matmul): quantkit's fp32 numbers
measure the quantization, not the bf16 kernel (on a held-out model the kernel read GPTQ w4g128's KL 3% high).
`int4_kernels(model)` switches the fast kernel on for a block of work where speed is what counts (decoding),
and `arithmetic(model)` says which arithmetic a model's quantized linears use, for reports.
"""

from __future__ import annotations

import logging
from collections import Counter
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.quant.affine import AffineWeight, trivial_g_idx
from quantkit.errors import QuantkitError
from quantkit.quant.packing import pack, unpack

log = logging.getLogger(__name__)

INT4_GROUP_SIZES = (32, 64, 128, 256)  # what the tinygemm kernels accept


def tinygemm_scales_and_zeros(scale: torch.Tensor, zero: torch.Tensor, dtype) -> torch.Tensor:
    """(K/g, N, 2) for tinygemm, whose convention is w = (q - 8) * scale + zero_float.

    An integer zero point z converts exactly: (q - z) * s = (q - 8) * s + (8 - z) * s.
    """
    zero_float = (8 - zero.to(torch.float32)) * scale.to(torch.float32)
    return torch.stack([scale.to(dtype), zero_float.to(dtype)], dim=-1).transpose(0, 1).contiguous()


def act_order_permutation(g_idx: torch.Tensor, group_size: int) -> torch.Tensor | None:
    """Column order that makes every group contiguous (groups of exactly group_size), or None if impossible."""
    perm = torch.argsort(g_idx.long(), stable=True)
    expected = torch.arange(g_idx.numel(), device=g_idx.device) // group_size
    return perm if torch.equal(g_idx.long()[perm], expected) else None


class AffineLinear(nn.Module):
    """y = x @ W^T (+ b), W = (q - zero) * scale per group; see the module docstring."""

    def __init__(self, w: AffineWeight, bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float16):
        super().__init__()
        self.out_features, self.in_features = w.shape
        self.bits, self.group_size, self.symmetric, self.dtype = w.bits, w.group_size, w.symmetric, dtype
        self.register_buffer("weight_packed", pack(w.q, w.bits))  # int32 (N, ceil(K*b/32))
        self.register_buffer("weight_scale", w.scale.to(dtype))  # (N, G)
        self.register_buffer("weight_zero_point", w.zero.to(torch.int32))  # (N, G)
        self.register_buffer("weight_g_idx", None if w.g_idx is None else w.g_idx.to(torch.int32))
        self.register_buffer("bias", None if bias is None else bias.to(dtype))
        self._kernel_device = None
        self.use_int4_kernel = self._int4_kernel_fits() and dtype != torch.float32  # fp32: exact (module docstring)

    # -- the portable state ----------------------------------------------------------------------

    def affine_weight(self) -> AffineWeight:
        q = unpack(self.weight_packed, self.bits, self.in_features)
        return AffineWeight(q=q, scale=self.weight_scale, zero=self.weight_zero_point, bits=self.bits,
                            group_size=self.group_size, symmetric=self.symmetric, g_idx=self.weight_g_idx)

    def dequantize(self) -> torch.Tensor:
        return self.affine_weight().dequantize(self.dtype)

    # -- pretraining_tp slices: modules computing row or column slices of this one --------------

    def _split_problem(self, tp: int, dim: int) -> str | None:
        """Why `split(tp, dim)` is impossible (one line, with the fix), or None."""
        if dim not in (0, 1):
            raise ValueError(f"dim={dim}: split slices rows (0) or columns (1)")
        size = (self.out_features, self.in_features)[dim]
        if tp < 1 or size % tp:
            return f"{('out', 'in')[dim]}_features={size} is not divisible by tp={tp}"
        width, groups = self.in_features // tp, self.weight_scale.shape[1]
        if dim == 0 or groups == 1:  # row slices keep whole rows; one group per row spans any column slice
            return None
        if not trivial_g_idx(self.weight_g_idx, self.group_size):
            return (f"act-order groups (weight_g_idx) scatter over the columns, so a slice of {width} columns "
                    f"does not hold whole groups: re-quantize with static groups (or without act-order), "
                    f"or use pretraining_tp=1")
        if width % self.group_size:
            return (f"group size {self.group_size} does not divide the column slice width {width} "
                    f"(in_features={self.in_features} / tp={tp}): use a pretraining_tp whose slices hold whole "
                    f"groups, or re-quantize with a group size dividing {width}")
        return None

    def split(self, tp: int, dim: int) -> list[AffineLinear]:
        """tp modules over bit-exact slices of this one's quantized state (no re-quantization).

        dim=0: each holds out_features/tp rows (concatenate their outputs); dim=1: each holds
        in_features/tp columns (sum their outputs, each fed its slice of the input). No bias: the caller
        adds it once after combining. Each part picks its own kernel: tinygemm where it fits and this
        module uses it, dequantize+matmul otherwise (e.g. out_features/tp not a multiple of 16).
        """
        problem = self._split_problem(tp, dim)
        if problem is not None:
            raise QuantkitError(f"cannot split a {self.bits}-bit AffineLinear into {tp} {('row', 'column')[dim]} "
                                f"slices: {problem}")
        w = self.affine_weight()
        return [self._part(w, i, tp, dim) for i in range(tp)]

    def _part(self, w: AffineWeight, i: int, tp: int, dim: int) -> AffineLinear:
        """Part i of split(tp, dim), from the unpacked weight w (N, K)."""
        rows, cols, groups, group_size, g_idx = slice(None), slice(None), slice(None), w.group_size, w.g_idx
        if dim == 0:  # rows [i*n, (i+1)*n) with all their groups
            n = self.out_features // tp
            rows = slice(i * n, (i + 1) * n)
        else:  # columns [i*k, (i+1)*k): whole groups, or every row's one per-channel group
            k = self.in_features // tp
            cols = slice(i * k, (i + 1) * k)
            if w.scale.shape[1] == 1:
                group_size = k
            else:
                groups = slice(i * k // group_size, (i + 1) * k // group_size)
            g_idx = None if g_idx is None else g_idx[cols] - (groups.start or 0)  # sorted (checked): rebased to 0
        part_w = AffineWeight(q=w.q[rows, cols], scale=w.scale[rows, groups].clone(), zero=w.zero[rows, groups].clone(),
                              bits=w.bits, group_size=group_size, symmetric=w.symmetric,
                              g_idx=None if g_idx is None else g_idx.clone())
        part = AffineLinear(part_w, dtype=self.dtype)
        part.use_int4_kernel = part._int4_kernel_fits() and self.use_int4_kernel  # follow this module's choice
        return part

    # -- the int4 kernel layout, built at load time for the device it runs on ------------------

    def _int4_kernel_fits(self) -> bool:
        if self.bits != 4 or self.group_size not in INT4_GROUP_SIZES or self.out_features % 16:
            return False
        return self.weight_g_idx is None or act_order_permutation(self.weight_g_idx, self.group_size) is not None

    def _build_kernel(self, device: torch.device):
        w = self.affine_weight()
        q, scale, zero = w.q.to(torch.int32), w.scale, w.zero
        perm = None if w.g_idx is None else act_order_permutation(w.g_idx, self.group_size)
        if perm is not None:  # columns sorted by group: W[:, perm] has contiguous groups, x[..., perm] matches
            groups = w.g_idx.long()[perm][:: self.group_size]  # the group of each contiguous block, in order
            q, scale, zero = q[:, perm], scale[:, groups], zero[:, groups]
        self.perm = perm
        if device.type == "cuda":
            self._build_cuda(q.to(device), scale.to(device), zero.to(device))
        else:
            self.kernel_dtype = torch.bfloat16  # the CPU kernel's fast path (see the module docstring)
            self.int4_weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
            self.scales_and_zeros = tinygemm_scales_and_zeros(scale, zero, torch.bfloat16)
        self._kernel_device = device

    def _build_cuda(self, q, scale, zero):
        # As torchao's Int4TilePackedTo4dTensor: bf16, K padded to 1024, N to 8, nibble pairs, inner_k_tiles 8.
        n_pad, k_pad = -self.out_features % 8, -self.in_features % 1024
        q = F.pad(q, (0, k_pad, 0, n_pad))
        groups_pad = k_pad // self.group_size
        scale = F.pad(scale, (0, groups_pad, 0, n_pad), value=1.0)
        zero = F.pad(zero, (0, groups_pad, 0, n_pad), value=8)
        self.kernel_dtype, self.k_pad = torch.bfloat16, k_pad
        paired = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
        self.int4_weight = torch.ops.aten._convert_weight_to_int4pack(paired.contiguous(), 8)
        self.scales_and_zeros = tinygemm_scales_and_zeros(scale, zero, torch.bfloat16)

    def _int4_matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel_device != x.device:
            self._build_kernel(x.device)
        if self.perm is not None:
            x = x[..., self.perm]
        x2 = x.reshape(-1, self.in_features).to(self.kernel_dtype).contiguous()  # the kernels take (M, K), contiguous
        if x.device.type == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(F.pad(x2, (0, self.k_pad)), self.int4_weight, self.group_size,
                                                   self.scales_and_zeros)[:, : self.out_features]
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.int4_weight, self.group_size,
                                                           self.scales_and_zeros)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def forward(self, x):
        y = self._int4_matmul(x) if self.use_int4_kernel else F.linear(x, self.dequantize().to(x.dtype))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def arithmetic(self) -> str:
        """What this module's matmul computes in: the bf16 int4 kernel, or dequantized weights in its dtype."""
        if self.use_int4_kernel:
            return "int4 tinygemm kernel (bf16 activations)"
        return f"dequantized weights, {str(self.dtype).removeprefix('torch.')} matmul"

    def extra_repr(self) -> str:
        kernel = "int4 tinygemm" if self.use_int4_kernel else "dequantize+matmul"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}, act_order={self.weight_g_idx is not None}, "
                f"kernel={kernel}")


def arithmetic(model: nn.Module) -> str:
    """How a model's quantized linears compute, for reports: e.g. 'dequantized weights, float32 matmul (28
    linears)', or several such parts joined by '; '. Modules other than AffineLinear are named by their class;
    a model with no quantized linear is 'dense'; a model of another runtime (eval.llamacpp) says it itself."""
    if callable(getattr(model, "runtime_arithmetic", None)):
        return model.runtime_arithmetic()
    counts = Counter(m.arithmetic() if isinstance(m, AffineLinear) else type(m).__name__
                     for m in model.modules() if getattr(m, "quant_record", None) is not None)
    if not counts:
        return "dense"
    return "; ".join(f"{kind} ({n} linear{'s' if n > 1 else ''})" for kind, n in counts.items())


@contextmanager
def int4_kernels(model: nn.Module, enabled: bool = True):
    """Within the block, every 4-bit AffineLinear the int4 kernels can run uses them, fp32 ones included (their
    activations are rounded to bf16): for decoding speed, never for measurements. enabled=False: none does (each
    computes with dequantized weights in its dtype). Restored afterwards."""
    modules = [m for m in model.modules() if isinstance(m, AffineLinear)]
    saved = [m.use_int4_kernel for m in modules]
    try:
        for m in modules:
            m.use_int4_kernel = enabled and m._int4_kernel_fits()
        yield model
    finally:
        for m, on in zip(modules, saved):
            m.use_int4_kernel = on
