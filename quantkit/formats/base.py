"""The interface every on-disk quantized format implements, and the format registry.

A format turns quantized runtime modules into named tensors plus the `quantization_config` that
goes into config.json (export), and turns such tensors back into runtime modules (load). Tensor
names are full Hugging Face names (`model.layers.0.self_attn.q_proj.weight_packed`); the module
name is everything before the last dot-separated tensor suffix the format owns.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from quantkit.affine import AffineWeight
from quantkit.dtypes import FLOAT_DTYPES, dtype_name
from quantkit.errors import QuantkitError



class QuantFormat:
    name: ClassVar[str]
    methods: ClassVar[tuple[str, ...]]  # backend names whose modules this format can write

    def export_module(self, name: str, module: nn.Module) -> dict[str, torch.Tensor]:
        """Tensors of one quantized linear, keyed by full tensor name (name + '.' + suffix)."""
        raise NotImplementedError

    def quantization_config(self, configs: dict[str, Any], ignored: list[str]) -> dict[str, Any]:
        """config.json's `quantization_config`.

        configs: module name -> the QuantConfig it was quantized with (every quantized linear);
        ignored: names of the linears left in full precision (always including lm_head).
        """
        raise NotImplementedError

    @classmethod
    def matches(cls, quantization_config: dict[str, Any]) -> bool:
        """Whether a config.json quantization_config is in this format."""
        raise NotImplementedError

    def quantized_modules(self, tensor_names: set[str]) -> set[str]:
        """Names of the modules stored quantized, from the checkpoint's tensor names."""
        raise NotImplementedError

    def extra_files(self, quantization_config: dict[str, Any]) -> dict[str, str]:
        """Files to write beside config.json (file name -> text), e.g. GPTQ's quantize_config.json."""
        return {}

    def load_module(self, name: str, tensors: dict[str, torch.Tensor], quantization_config: dict[str, Any],
                    dtype: torch.dtype) -> nn.Module:
        """A runtime module from one module's tensors (keys relative: 'weight_packed', 'qweight', ...)."""
        raise NotImplementedError


# -- checks shared by the formats -------------------------------------------------------------

def affine_of(name: str, module: nn.Module, format_name: str) -> AffineWeight:
    """The canonical quantized weight of a module, or a QuantkitError if it is not an integer-affine linear."""
    from quantkit.modules import AffineLinear  # modules imports formats.packing: import here, not at the top

    if not isinstance(module, AffineLinear):
        raise QuantkitError(f"{name}: a {type(module).__name__} is not an integer-affine quantized linear: "
                            f"the {format_name} format writes int4, rtn and gptq modules only")
    return module.affine_weight()


def trivial_g_idx(g_idx: torch.Tensor | None, group_size: int) -> bool:
    """Whether g_idx is absent or just column // group_size (no act-order permutation)."""
    return g_idx is None or torch.equal(g_idx.long(), torch.arange(g_idx.numel(), device=g_idx.device) // group_size)


def check_tensor(name: str, key: str, tensors: dict[str, torch.Tensor], shape: tuple[int, ...],
                 dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
    """tensors[key], checked for presence, shape and dtype; the error names module.key."""
    if key not in tensors:
        raise QuantkitError(f"{name}.{key}: missing from the checkpoint: re-export the model")
    t = tensors[key]
    if tuple(t.shape) != tuple(shape) or t.dtype not in dtypes:
        want = "/".join(dtype_name(d) for d in dtypes)
        got = f"{dtype_name(t.dtype)} {list(t.shape)}"
        raise QuantkitError(f"{name}.{key}: is {got}, expected {want} {list(shape)}: the checkpoint does not "
                            f"match its quantization_config; re-export it")
    return t


def check_g_idx(name: str, key: str, tensors: dict[str, torch.Tensor], k: int, groups: int) -> torch.Tensor:
    """An int (K,) group index whose values all name one of the `groups` groups."""
    g_idx = check_tensor(name, key, tensors, (k,), (torch.int32, torch.int64)).to(torch.int32)
    if k and not (0 <= int(g_idx.min()) and int(g_idx.max()) < groups):
        raise QuantkitError(f"{name}.{key}: group indices outside [0, {groups}): re-export the model")
    return g_idx


def check_known(name: str, tensors: dict[str, torch.Tensor], known: tuple[str, ...]):
    """Refuse tensors the format does not define (e.g. input_scale of activation quantization)."""
    unknown = sorted(set(tensors) - set(known))
    if unknown:
        raise QuantkitError(f"{name}: unexpected tensor(s) {', '.join(unknown)}: this checkpoint uses features "
                            f"quantkit does not read (activation quantization?)")
