"""GPTQ checkpoints (`quant_method: gptq`), read by GPTQModel, transformers (through optimum + gptqmodel) and vLLM.

Per quantized linear (N out, K in, b bits, G groups):

- `qweight` int32 (ceil(K*b/32), N): q packed along K (dim 0), dense LSB first; for 3 bits this is
  AutoGPTQ's 32-values-in-3-words layout.
- `qzeros` int32 (G, ceil(N*b/32)): the zero points packed along N, in one of two layouts named by
  `checkpoint_format` (ZERO_OFFSET):
  - `gptq` (AutoGPTQ's v1) stores z - 1 and loaders add 1 back. z = 0 cannot be stored: AutoGPTQ masks
    (z - 1) & (2^b - 1) per field, GPTQModel subtracts one constant from the whole packed word (so a 0 borrows
    from its neighbour, undone exactly by its own add on load), ExLlama adds 1 without a mask. Symmetric
    schemes (z = 2^(b-1)) never meet this, and every GPTQ runtime reads v1: quantkit writes symmetric files so.
  - `gptq_v2` (GPTQModel's) stores z itself, exactly. quantkit writes asymmetric files so: GPTQModel and
    transformers through it load them as they are, and vLLM's GPTQ kernel reads them (`use_v2_format`,
    vllm#26092; its Marlin and BitBLAS paths take only symmetric schemes). GPTQModel refuses asymmetric v1
    files that do not say GPTQModel >= 0.9 wrote them, and quantkit does not claim another tool's provenance:
    `meta.quantizer` says quantkit.
- `scales` fp16 (G, N); `g_idx` int32 (K,), always written (column // group_size without act-order);
  `bias` fp16 (N,) when the linear has one.

Reading: both layouts; a v1 file whose `meta.quantizer` names gptqmodel is read with its whole-word convention
(2, 4 and 8 bits; 3-bit fields straddle words, so GPTQModel masks each field as AutoGPTQ does); any other v1
file per field, masked, with a warning where that yields z = 0 (ExLlama would read 2^b).

One file holds one scheme (bits, group size, symmetry, GPTQ options): mixed precision is refused.
Linears inside the decoder layers may stay in full precision only if the same ones do in every layer
(they are left out of `modules_in_block_to_quantize`, which optimum reads); outside the layers
(lm_head) nothing is quantized anyway.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch
from torch import nn

from quantkit.quant.affine import PER_CHANNEL, AffineWeight, affine_scheme, resolve_group_size, trivial_g_idx
from quantkit.dtypes import FLOAT_DTYPES
from quantkit.errors import QuantkitError
from quantkit.formats.base import (AffineFormat, affine_of, check_g_idx, check_known, check_tensor, padding_problems,
                                   refuses_non_affine)
from quantkit.model.layout import block_of
from quantkit.quant.packing import pack, packed_size, unpack

log = logging.getLogger(__name__)

TENSORS = ("qweight", "qzeros", "scales", "g_idx", "bias")
QPARAM_KEYS = ("scales", "qzeros", "g_idx")  # where scales, zero points and the group map are stored
# quantization_config key -> (QuantConfig attribute, default when the config has none)
OPTIONS = {"desc_act": ("desc_act", False), "damp_percent": ("damp_percent", 0.01),
           "true_sequential": ("true_sequential", True), "static_groups": ("static_groups", False)}
ZERO_OFFSET = {"gptq": 1, "gptq_v2": 0}  # checkpoint_format -> what is subtracted from z before it is stored


def checkpoint_format(symmetric: bool) -> str:
    """The layout quantkit writes: v1 where every runtime reads it exactly (symmetric), else v2 (see above)."""
    return "gptq" if symmetric else "gptq_v2"


def stored_format(quantization_config: dict[str, Any]) -> str:
    """A file's layout: `checkpoint_format` (older files: `format`), v1 when absent, as transformers reads it."""
    qc = quantization_config
    return str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()


def written_by_gptqmodel(quantization_config: dict[str, Any]) -> bool:
    """Whether `meta.quantizer` (GPTQModel's "tool:version" list) names gptqmodel."""
    meta = quantization_config.get("meta")
    quantizer = meta.get("quantizer") if isinstance(meta, dict) else None
    entries = quantizer if isinstance(quantizer, list) else [quantizer]
    return any(isinstance(e, str) and e.lower().startswith("gptqmodel:") for e in entries)


def scheme_of(config: Any) -> dict[str, Any]:
    """The quantization_config fields one QuantConfig determines; int4 (no `symmetric`) is asymmetric."""
    s = affine_scheme(config)
    scheme = {"bits": s.bits, "group_size": s.group_size, "sym": s.symmetric}
    scheme.update({key: getattr(config, attr, default) for key, (attr, default) in OPTIONS.items()})
    return scheme


def describe(scheme: dict[str, Any], names: list[str]) -> str:
    example = names[0] + (f" and {len(names) - 1} more" if len(names) > 1 else "")
    return ", ".join(f"{k}={v}" for k, v in scheme.items()) + f" ({example})"


def layout_problem(quantized: list[str], ignored: list[str]) -> str | None:
    """Why one gptq config cannot describe which linears are quantized (one line), or None."""
    outside = next((name for name in quantized if block_of(name) is None), None)
    if outside is not None:
        return (f"{outside}: gptq quantizes linears inside the decoder layers only: leave it in full precision or "
                f"use --format compressed-tensors")
    per_block = _per_block(quantized)
    ignored_blocks = {block_of(n) for n in ignored} - {None}
    if ignored_blocks and (len({frozenset(s) for s in per_block.values()}) != 1 or not ignored_blocks <= set(per_block)):
        example = sorted(ignored)[0]
        return (f"the full-precision linears differ between decoder layers ({example} is kept, the same linear of "
                f"other layers is quantized), which one gptq config (modules_in_block_to_quantize) cannot express: "
                f"ignore the same linears in every layer, or use --format compressed-tensors")
    return None


def _per_block(quantized: list[str]) -> dict[str, set[str]]:
    per_block: dict[str, set[str]] = {}
    for name in quantized:
        block = block_of(name)
        per_block.setdefault(block, set()).add(name[len(block) + 1:])
    return per_block


def block_modules(quantized: list[str], ignored: list[str]) -> list[str] | None:
    """Names inside a decoder layer that are quantized, when some in-layer linears are not; None if all are."""
    problem = layout_problem(quantized, ignored)
    if problem is not None:
        raise QuantkitError(f"gptq: {problem}")
    if not {block_of(n) for n in ignored} - {None}:
        return None
    return sorted(next(iter(_per_block(quantized).values())))


class GPTQFormat(AffineFormat):
    qparam_keys = QPARAM_KEYS
    name = "gptq"

    def refuses_config(self, config: Any) -> str | None:
        if affine_scheme(config) is None:
            return f"{config.method} has no integer-affine scheme (bits, group_size), which is all the gptq format holds"
        return None

    def refuses_configs(self, configs: list[Any]) -> str | None:
        reason = super().refuses_configs(configs)
        if reason is None and len({json.dumps(scheme_of(c), sort_keys=True) for c in configs}) > 1:
            schemes = "; ".join(sorted({c.describe() for c in configs}))
            return f"one gptq file holds one quantization scheme, but the recipe uses several ({schemes})"
        return reason

    def refuses_module(self, module: nn.Module) -> str | None:
        return refuses_non_affine(module, self.name)

    def refuses_layout(self, configs: dict[str, Any], ignored: list[str]) -> str | None:
        return layout_problem(list(configs), ignored)

    def export_module(self, name: str, module: nn.Module) -> dict[str, torch.Tensor]:
        w = affine_of(name, module, self)
        record = getattr(module, "quant_record", None)
        config = record.config if record is not None else None
        if config is not None and not getattr(config, "desc_act", False) and not trivial_g_idx(w.g_idx, w.group_size):
            raise QuantkitError(f"{name}: has an act-order g_idx but its config says desc_act=False, so loaders "
                                f"would ignore g_idx: quantize it again")
        stored_zero = w.zero - ZERO_OFFSET[checkpoint_format(w.symmetric)]  # in [0, 2^b): v1 only when symmetric
        scales = w.scale.t().to(torch.float16).contiguous()  # (G, N): the v1 kernels take fp16
        if not bool(torch.isfinite(scales).all()):
            raise QuantkitError(f"{name}: scales overflow float16, which gptq stores: use --format compressed-tensors")
        out = {"qweight": pack(w.q.t(), w.bits, dim=0),  # int32 (ceil(K*b/32), N)
               "qzeros": pack(stored_zero.t().to(torch.uint8), w.bits, dim=1),  # int32 (G, ceil(N*b/32))
               "scales": scales,
               "g_idx": w.group_index().to(torch.int32)}  # (K,)
        if module.bias is not None:
            out["bias"] = module.bias.to(torch.float16)
        return {f"{name}.{key}": t.contiguous() for key, t in out.items()}

    def quantization_config(self, configs: dict[str, Any], ignored: list[str]) -> dict[str, Any]:
        by_scheme: dict[str, tuple[dict[str, Any], list[str]]] = {}
        for module_name, config in configs.items():
            scheme = scheme_of(config)
            by_scheme.setdefault(json.dumps(scheme, sort_keys=True), (scheme, []))[1].append(module_name)
        if not by_scheme:
            raise QuantkitError("gptq: no quantized modules to describe: quantize the model first")
        if len(by_scheme) > 1:
            schemes = "; ".join(describe(s, names) for s, names in by_scheme.values())
            raise QuantkitError(f"gptq: one file holds one quantization scheme, but the recipe uses "
                                f"{len(by_scheme)}: {schemes}: use --format compressed-tensors for mixed precision")
        scheme = next(iter(by_scheme.values()))[0]
        from quantkit.version import __version__

        qc = {"quant_method": "gptq", **scheme, "checkpoint_format": checkpoint_format(scheme["sym"]),
              "meta": {"quantizer": [f"quantkit:{__version__}"]}}
        in_block = block_modules(list(configs), ignored)
        if in_block is not None:
            qc["modules_in_block_to_quantize"] = [in_block]
        return qc

    def extra_files(self, quantization_config: dict[str, Any]) -> dict[str, str]:
        """AutoGPTQ's quantize_config.json, which older loaders read instead of config.json."""
        return {"quantize_config.json": json.dumps(quantization_config, indent=2) + "\n"}

    @classmethod
    def matches(cls, quantization_config: dict[str, Any]) -> bool:
        return quantization_config.get("quant_method") == "gptq" and stored_format(quantization_config) in ZERO_OFFSET

    def quantized_modules(self, tensor_names: set[str]) -> set[str]:
        return {n.removesuffix(".qweight") for n in tensor_names if n.endswith(".qweight")}

    def _padding_problems(self, name: str, tensors: dict[str, torch.Tensor], w: AffineWeight) -> list[str]:
        problems = padding_problems(name, "qweight", tensors["qweight"], w.bits, w.shape[1], dim=0)
        return problems + padding_problems(name, "qzeros", tensors["qzeros"], w.bits, w.shape[0], dim=1)

    def _stored_affine(self, name: str, tensors: dict[str, torch.Tensor],
                       quantization_config: dict[str, Any]) -> AffineWeight:
        """The module's weight from its tensors, their names, shapes and dtypes checked against the config."""
        qc = quantization_config
        bits, group_size, sym = qc.get("bits"), qc.get("group_size", -1), bool(qc.get("sym", True))
        if bits not in (2, 3, 4, 8) or not isinstance(group_size, int) or not (group_size > 0 or group_size == PER_CHANNEL):
            raise QuantkitError(f"gptq quantization_config: bits={bits!r} group_size={group_size!r} are not a gptq "
                                f"scheme (bits 2, 3, 4 or 8; group_size positive or -1): fix config.json")
        check_known(name, tensors, TENSORS)
        return self._affine(name, tensors, bits, group_size, sym, stored_format(qc),
                            whole_word=written_by_gptqmodel(qc) and not sym and bits != 3)

    def config_of(self, name: str, module: nn.Module, quantization_config: dict[str, Any]) -> Any:
        """GPTQ with the stored scheme and options (damp, act-order, ...), whatever wrote the file."""
        from quantkit.backends.gptq import GPTQConfig

        qc = quantization_config
        options = {attr: qc.get(key, default) for key, (attr, default) in OPTIONS.items()}
        return GPTQConfig(bits=qc.get("bits"), group_size=qc.get("group_size", PER_CHANNEL),
                          symmetric=bool(qc.get("sym", True)), **options)

    @staticmethod
    def _affine(name: str, tensors: dict[str, torch.Tensor], bits: int, group_size: int, sym: bool,
                layout: str, whole_word: bool) -> AffineWeight:
        if "qweight" not in tensors or tensors["qweight"].dim() != 2:
            raise QuantkitError(f"{name}.qweight: missing or not 2-D: re-export the model")
        n = tensors["qweight"].shape[1]
        # K: from g_idx, which AutoGPTQ always writes; else from qweight, exact when K*b is a multiple of 32.
        k = tensors["g_idx"].numel() if "g_idx" in tensors else tensors["qweight"].shape[0] * 32 // bits
        group_size = resolve_group_size(group_size, k, name, partial_ok=True)  # AutoGPTQ allows a last partial group
        g = -(-k // group_size)
        qweight = check_tensor(name, "qweight", tensors, (packed_size(k, bits), n), (torch.int32,))
        qzeros = check_tensor(name, "qzeros", tensors, (g, packed_size(n, bits)), (torch.int32,))
        scales = check_tensor(name, "scales", tensors, (g, n), FLOAT_DTYPES)
        g_idx = check_g_idx(name, "g_idx", tensors, k, g) if "g_idx" in tensors else None
        zero = stored_zeros(name, qzeros, bits, n, ZERO_OFFSET[layout], whole_word)  # (G, N)
        return AffineWeight(q=unpack(qweight, bits, k, dim=0).t().contiguous(), scale=scales.t().contiguous(),
                            zero=zero.t().contiguous(), bits=bits, group_size=group_size, symmetric=sym,
                            g_idx=None if trivial_g_idx(g_idx, group_size) else g_idx)


def stored_zeros(name: str, qzeros: torch.Tensor, bits: int, n: int, offset: int, whole_word: bool) -> torch.Tensor:
    """Zero points (G, N) int32 from qzeros stored as z - offset: per field and masked, or (whole_word, GPTQModel's
    v1 for 2/4/8 bits) by adding offset to every field of the packed int32 word with carries, as it loads them."""
    mask = 2**bits - 1
    if whole_word and offset:
        per_word = sum(offset << (bits * i) for i in range(32 // bits))  # 0x11111111 for 4 bits
        words = (qzeros.to(torch.int64) + per_word) & 0xFFFFFFFF
        words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
        return unpack(words, bits, n, dim=1).to(torch.int32)
    zero = (unpack(qzeros, bits, n, dim=1).to(torch.int32) + offset) & mask
    zero_count = int((zero == 0).sum()) if offset else 0
    if zero_count:
        log.warning("%s.qzeros: %d group(s) of this GPTQ v1 file store %d, read as zero point 0 (AutoGPTQ's masked "
                    "convention); kernels that add 1 without a mask (ExLlama) read %d", name, zero_count, mask,
                    mask + 1)
    return zero
