"""compressed-tensors `pack-quantized`: the layout llm-compressor writes and vLLM serves.

Per quantized linear (N out, K in, b bits, G groups), exactly what compressed-tensors 0.20's
`PackedQuantizationCompressor` stores:

- `weight_packed` int32 (N, ceil(K*b/32)): q packed along K, dense LSB first (`pack_to_int32`).
  compressed-tensors quantizes to signed q_s in [-2^(b-1), 2^(b-1)) and stores q_s + 2^(b-1),
  which is our unsigned q.
- `weight_scale` (N, G) in the model dtype; `weight_shape` int64 [N, K].
- `weight_zero_point` int32 (ceil(N*b/32), G), asymmetric only: packed along N (dim 0), again
  stored with the + 2^(b-1) offset, i.e. our unsigned z. Symmetric schemes store no zero point.
- `weight_g_idx` int32 (K,): read only. It belonged to `actorder: "group"`, which
  compressed-tensors 0.20 removed (its config validator rejects it, so neither transformers nor a
  vLLM built on it loads such a file); an act-order model is exported in the gptq format instead.

compressed-tensors and transformers are not needed to write or read this format; the tests check
the files against compressed-tensors' own compressor, decompressor and target matching, and
transformers' loader. Known reader limits (transformers 5.24 + compressed-tensors 0.20): asymmetric
schemes (int4 included) load only with `CompressedTensorsConfig(dequantize=True)`, since the default
path expects an unpacked zero point; that path decompresses every module with the first config group,
so asymmetric mixed precision loads in neither. vLLM fuses q/k/v and gate/up and needs each fused
set in one scheme.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quantkit.quant.affine import PER_CHANNEL, AffineScheme, AffineWeight, affine_scheme, resolve_group_size, trivial_g_idx
from quantkit.dtypes import FLOAT_DTYPES
from quantkit.errors import QuantkitError
from quantkit.formats.base import (AffineFormat, affine_of, check_g_idx, check_known, check_tensor, padding_problems,
                                   refuses_non_affine)
from quantkit.model.layout import layer_index, local_name
from quantkit.quant.packing import pack, packed_size, unpack

log = logging.getLogger(__name__)

CT_VERSION = "0.20.0"  # the compressed-tensors release whose layout and config this writes
PACK_QUANTIZED = "pack-quantized"
TENSORS = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")
QPARAM_KEYS = ("weight_scale", "weight_zero_point", "weight_g_idx")  # where scales, zero points, g_idx are stored
ACT_ORDER_REFUSED = ("compressed-tensors 0.20 no longer reads act-order groups (actorder 'group', weight_g_idx): "
                     "export with --format gptq, or quantize with gptq static_groups=True")


# -- the weight scheme of a config group -------------------------------------------------------

@dataclass(frozen=True)
class WeightScheme:
    bits: int
    group_size: int  # -1: one group per row ('channel' strategy)
    symmetric: bool
    actorder: str | None = None  # 'weight': act-order used in calibration only, groups stay contiguous

    @classmethod
    def of_scheme(cls, scheme: AffineScheme) -> "WeightScheme":
        """From an affine scheme the format holds (no scattered act-order groups)."""
        return cls(scheme.bits, scheme.group_size, scheme.symmetric, "weight" if scheme.act_order else None)

    @classmethod
    def of_json(cls, weights: dict[str, Any], group: str) -> "WeightScheme":
        """From a config group's `weights`; refuses what pack-quantized integer weights never use."""
        bits, group_size = weights.get("num_bits"), weights.get("group_size")
        strategy = weights.get("strategy") or ("channel" if group_size in (None, -1) else "group")
        if (weights.get("type", "int") != "int" or strategy not in ("group", "channel") or weights.get("dynamic")
                or not (isinstance(bits, int) and 1 <= bits <= 8)
                or (strategy == "group" and not (isinstance(group_size, int) and group_size > 0))):
            raise QuantkitError(f"compressed-tensors config group {group}: weights {weights} are not integer "
                                f"per-group or per-channel quantization, which is all quantkit reads")
        return cls(bits, group_size if strategy == "group" else PER_CHANNEL, bool(weights.get("symmetric", True)),
                   weights.get("actorder"))

    def to_json(self) -> dict[str, Any]:
        weights = {"num_bits": self.bits, "type": "int", "symmetric": self.symmetric, "group_size": self.group_size,
                   "strategy": "channel" if self.group_size == PER_CHANNEL else "group", "dynamic": False,
                   "observer": "minmax"}
        if self.actorder:
            weights["actorder"] = self.actorder
        return weights


def regex_targets(names: list[str], all_names: set[str]) -> list[str]:
    """Targets selecting exactly `names` among `all_names`: one `re:` per layer-relative suffix that
    this scheme holds in every layer (e.g. `re:.*\\.mlp\\.down_proj$`), exact names for the rest."""
    targets, rest = [], set(names)
    for suffix in sorted({local_name(n) for n in names if layer_index(n) is not None}):
        pattern = r".*\." + re.escape(suffix) + "$"
        hits = {n for n in all_names if re.match(pattern, n)}
        if hits <= set(names):  # the pattern selects nothing outside this scheme
            targets.append("re:" + pattern)
            rest -= hits
    return targets + sorted(rest)


def resolve_group(name: str, quantization_config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The config group compressed-tensors applies to linear `name`: exact > re: > 'Linear', minus ignore."""
    groups = quantization_config.get("config_groups") or {}
    target_to_group = {t: g for g, scheme in groups.items() for t in scheme.get("targets", [])}

    def matches(target: str) -> bool:
        return re.match(target[3:], name) is not None if target.startswith("re:") else target in (name, "Linear")

    if any(matches(t) for t in quantization_config.get("ignore") or []):
        raise QuantkitError(f"{name}: stored quantized but listed in quantization_config.ignore: re-export the model")
    ordered = sorted((t for t in target_to_group if t != "Linear"), key=lambda t: (t.startswith("re:"), t))
    for target in ordered + (["Linear"] if "Linear" in target_to_group else []):
        if matches(target):
            group = target_to_group[target]
            return group, groups[group]
    raise QuantkitError(f"{name}: stored quantized but no compressed-tensors config group targets it: "
                        f"fix quantization_config.config_groups")


# -- the format ----------------------------------------------------------------------------------

class CompressedTensorsFormat(AffineFormat):
    qparam_keys = QPARAM_KEYS
    name = "compressed-tensors"

    def refuses_config(self, config: Any) -> str | None:
        scheme = affine_scheme(config)
        if scheme is None:
            return (f"{config.method} has no integer-affine scheme (bits, group_size), which is all the "
                    f"compressed-tensors format holds")
        return ACT_ORDER_REFUSED if scheme.scattered_groups else None

    def refuses_module(self, module: nn.Module) -> str | None:
        reason = refuses_non_affine(module, self.name)
        if reason is None and not trivial_g_idx(module.weight_g_idx, module.group_size):
            return f"has an act-order g_idx: {ACT_ORDER_REFUSED}"
        return reason

    def export_module(self, name: str, module: nn.Module) -> dict[str, torch.Tensor]:
        w = affine_of(name, module, self)
        n, k = w.shape
        out = {"weight_packed": pack(w.q, w.bits, dim=1),  # int32 (N, ceil(K*b/32))
               "weight_scale": w.scale.contiguous(),  # (N, G), the model dtype
               "weight_shape": torch.tensor([n, k], dtype=torch.int64)}
        if w.symmetric:
            if not bool((w.zero == 2 ** (w.bits - 1)).all()):
                raise QuantkitError(f"{name}: symmetric but its zero points are not 2^(bits-1): "
                                    f"the module is corrupt; quantize it again")
        else:
            if not bool(((w.zero >= 0) & (w.zero < 2**w.bits)).all()):
                raise QuantkitError(f"{name}: zero points outside [0, 2^{w.bits}): quantize it again")
            out["weight_zero_point"] = pack(w.zero.to(torch.uint8), w.bits, dim=0)  # int32 (ceil(N*b/32), G)
        if module.bias is not None:
            out["bias"] = module.bias.contiguous()
        return {f"{name}.{key}": t for key, t in out.items()}

    def quantization_config(self, configs: dict[str, Any], ignored: list[str]) -> dict[str, Any]:
        """One config group per distinct weight scheme. A single scheme targets class 'Linear' minus
        `ignore`, as llm-compressor writes it. With several, every group names its modules by `re:`
        patterns or exact names instead: a 'Linear' target would also catch vLLM's fused qkv_proj and
        gate_up_proj by class name before vLLM looks at their shards' names."""
        for config in configs.values():
            if (reason := self.refuses_config(config)) is not None:
                raise QuantkitError(f"{config.describe()}: {reason}")
        schemes = {name: WeightScheme.of_scheme(affine_scheme(config)) for name, config in configs.items()}
        if not schemes:
            raise QuantkitError("compressed-tensors: no quantized modules to describe: quantize the model first")
        by_scheme: dict[WeightScheme, list[str]] = {}
        for name, scheme in schemes.items():
            by_scheme.setdefault(scheme, []).append(name)
        all_names = set(configs) | set(ignored)
        groups = {}
        for i, (scheme, names) in enumerate(by_scheme.items()):
            targets = ["Linear"] if len(by_scheme) == 1 else regex_targets(names, all_names)
            groups[f"group_{i}"] = {"targets": targets, "weights": scheme.to_json(), "input_activations": None,
                                    "output_activations": None, "format": PACK_QUANTIZED}
        return {"quant_method": "compressed-tensors", "format": PACK_QUANTIZED, "quantization_status": "compressed",
                "config_groups": groups, "ignore": sorted(set(ignored)), "kv_cache_scheme": None,
                "global_compression_ratio": None, "sparsity_config": {}, "transform_config": {},
                "version": CT_VERSION}

    @classmethod
    def matches(cls, quantization_config: dict[str, Any]) -> bool:
        if quantization_config.get("quant_method") != "compressed-tensors":
            return False
        formats = {g.get("format") or quantization_config.get("format")
                   for g in (quantization_config.get("config_groups") or {}).values()}
        return quantization_config.get("format") == PACK_QUANTIZED or formats == {PACK_QUANTIZED}

    def quantized_modules(self, tensor_names: set[str]) -> set[str]:
        return {n.removesuffix(".weight_packed") for n in tensor_names if n.endswith(".weight_packed")}

    def _padding_problems(self, name: str, tensors: dict[str, torch.Tensor], w: AffineWeight) -> list[str]:
        problems = padding_problems(name, "weight_packed", tensors["weight_packed"], w.bits, w.shape[1], dim=1)
        if "weight_zero_point" in tensors:
            problems += padding_problems(name, "weight_zero_point", tensors["weight_zero_point"], w.bits, w.shape[0],
                                         dim=0)
        return problems

    def _stored_affine(self, name: str, tensors: dict[str, torch.Tensor],
                       quantization_config: dict[str, Any]) -> AffineWeight:
        """The module's weight from its tensors, their names, shapes and dtypes checked against its config group."""
        group, scheme = resolve_group(name, quantization_config)
        if scheme.get("input_activations") or scheme.get("output_activations"):
            raise QuantkitError(f"{name}: config group {group} quantizes activations, which quantkit does not run")
        s = WeightScheme.of_json(scheme.get("weights") or {}, group)
        check_known(name, tensors, TENSORS + ("bias",))
        n, k = (int(v) for v in check_tensor(name, "weight_shape", tensors, (2,), (torch.int64, torch.int32)))
        return self._affine(name, tensors, s, n, k)

    def config_of(self, name: str, module: nn.Module, quantization_config: dict[str, Any]) -> Any:
        """Round-to-nearest of the stored scheme: what any integer-affine weight is, whatever made it."""
        from quantkit.backends.rtn import RTNConfig

        group, scheme = resolve_group(name, quantization_config)
        s = WeightScheme.of_json(scheme.get("weights") or {}, group)
        return RTNConfig(s.bits, s.group_size, s.symmetric)

    @staticmethod
    def _affine(name: str, tensors: dict[str, torch.Tensor], s: WeightScheme, n: int, k: int) -> AffineWeight:
        group_size = resolve_group_size(s.group_size, k, name, fix="fix quantization_config")
        g = k // group_size
        packed = check_tensor(name, "weight_packed", tensors, (n, packed_size(k, s.bits)), (torch.int32,))
        scale = check_tensor(name, "weight_scale", tensors, (n, g), FLOAT_DTYPES)
        if s.symmetric:
            zero = torch.full((n, g), 2 ** (s.bits - 1), dtype=torch.int32)
        else:
            zp = check_tensor(name, "weight_zero_point", tensors, (packed_size(n, s.bits), g), (torch.int32,))
            zero = unpack(zp, s.bits, n, dim=0).to(torch.int32)  # (N, G)
        g_idx = None
        if "weight_g_idx" in tensors:  # legacy actorder 'group' files (compressed-tensors < 0.20)
            g_idx = check_g_idx(name, "weight_g_idx", tensors, k, g)
            g_idx = None if trivial_g_idx(g_idx, group_size) else g_idx
        return AffineWeight(q=unpack(packed, s.bits, k, dim=1), scale=scale, zero=zero, bits=s.bits,
                            group_size=group_size, symmetric=s.symmetric, g_idx=g_idx)
