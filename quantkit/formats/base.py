"""The interface every on-disk quantized format implements.

A format judges what it can hold (a config before any work: `refuses_config`; each module when it is
written: `refuses_module`), turns quantized modules into named tensors plus the `quantization_config`
that goes into config.json (export), turns such tensors back into runtime modules and their configs
(load), and owns its container: `open_sink` takes the tensors as they are produced and `finish`
writes everything else. The default container is the Hugging Face directory (sharded safetensors,
config.json, tokenizer files); a single-file format overrides both. Tensor names are full Hugging
Face names (`model.layers.0.self_attn.q_proj.weight_packed`); the module name is everything before
the last dot-separated tensor suffix the format owns.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from quantkit.quant.affine import AffineWeight, affine_scheme
from quantkit.dtypes import FLOAT_DTYPES, dtype_name
from quantkit.errors import QuantkitError
from quantkit.io.files import atomic_dir, check_output_dir
from quantkit.model.config import LlamaConfig
from quantkit.model.save import copy_tokenizer_files
from quantkit.model.layout import FUSED_SHARDS, local_name
from quantkit.io.shards import ShardWriter
from quantkit.quant.linear import AffineLinear
from quantkit.quant.packing import pack, unpack
from quantkit.quant.record import ERRORS_FILE


class QuantFormat:
    name: ClassVar[str]

    # -- what it can hold ---------------------------------------------------------------------------

    def refuses_config(self, config: Any) -> str | None:
        """Why this format cannot hold modules quantized with `config` (one line), or None.

        Judged before any work; None means "possibly": every module is judged again when written.
        """
        return None

    def refuses_configs(self, configs: list[Any]) -> str | None:
        """Why it cannot hold a recipe's configs together (e.g. one scheme per file), or None."""
        return next((r for r in map(self.refuses_config, configs) if r is not None), None)

    def refuses_module(self, module: nn.Module) -> str | None:
        """Why this format cannot hold this quantized module (one line), or None."""
        raise NotImplementedError

    def refuses_layout(self, configs: dict[str, Any], ignored: list[str]) -> str | None:
        """Why this format cannot hold this assignment of the decoder linears (one line), or None.

        configs: each quantized linear's config; ignored: the decoder linears kept in full precision (full
        names). Judged before any work, from the recipe and the model's module names, and so is what the
        assignment would cost elsewhere (`layout_warnings`).
        """
        return None

    def layout_warnings(self, configs: dict[str, Any], ignored: list[str]) -> list[str]:
        """What the assignment costs in the runtimes that serve this format (one line each): vLLM fuses q/k/v and
        gate/up into one linear each and refuses fused shards with different schemes or full precision."""
        schemes = {name: affine_scheme(c) or c for name, c in configs.items()}
        split = []
        for name in [*configs, *ignored]:
            for shards in FUSED_SHARDS:
                block = name[: -len(shards[0])]  # 'model.layers.0.' for a self_attn.q_proj
                if local_name(name) == shards[0] and len({schemes.get(block + s) for s in shards}) > 1:
                    split.append(name.rpartition(".")[0] + "." + "/".join(s.rpartition(".")[2] for s in shards))
        if not split:
            return []
        return [f"{len(split)} group(s) of linears that vLLM fuses mix schemes or full precision ({split[0]}"
                f"{', ...' if len(split) > 1 else ''}): vLLM will refuse this checkpoint"]

    # -- export ---------------------------------------------------------------------------------------

    def export_module(self, name: str, module: nn.Module) -> dict[str, torch.Tensor]:
        """Tensors of one quantized linear, keyed by full tensor name (name + '.' + suffix)."""
        raise NotImplementedError

    def quantization_config(self, configs: dict[str, Any], ignored: list[str]) -> dict[str, Any]:
        """config.json's `quantization_config`.

        configs: module name -> the QuantConfig it was quantized with (every quantized linear);
        ignored: names of the linears left in full precision (always including lm_head).
        """
        raise NotImplementedError

    def extra_files(self, quantization_config: dict[str, Any]) -> dict[str, str]:
        """Files to write beside config.json (file name -> text), e.g. GPTQ's quantize_config.json."""
        return {}

    # -- the container --------------------------------------------------------------------------------

    def refuses_model(self, config: LlamaConfig, tokenizer_dir: Path | None) -> str | None:
        """Why this format cannot hold this model at all (its architecture, its tokenizer: one line), or None.
        Judged before any work."""
        return None

    def check_output(self, out: Path, overwrite: bool, keep=()):
        """Refuse, before any work, an output the container cannot be written to (QuantkitError, one line)."""
        check_output_dir(out, overwrite, keep)

    def container(self, out: Path, overwrite: bool, keep=()) -> contextlib.AbstractContextManager[Path]:
        """The output's atomic temporary, moved into place when the block ends normally: a directory (atomic_dir; the
        writer adds quantkit's manifest of it last); a single-file format yields a file (atomic_new_file)."""
        return atomic_dir(out, overwrite, keep)

    def open_sink(self, directory: Path, max_shard_size: int | str, metadata: dict[str, str], config: LlamaConfig):
        """Where the tensors go as they are produced: an object with add(name, tensor), close() and total_size.
        directory: what `container` yielded; config: the model's."""
        return ShardWriter(directory, max_shard_size, metadata=metadata)

    def finish(self, directory: Path, config_json: dict[str, Any], tokenizer_dir: Path | None,
               errors: list[dict]) -> None:
        """Everything but the tensors: config.json, the format's extra files, tokenizer, per-linear errors."""
        (directory / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
        if errors:
            (directory / ERRORS_FILE).write_text(json.dumps(errors, indent=1) + "\n")
        for file_name, text in self.extra_files(config_json["quantization_config"]).items():
            (directory / file_name).write_text(text)
        copy_tokenizer_files(tokenizer_dir, directory)

    # -- load -----------------------------------------------------------------------------------------

    @classmethod
    def matches(cls, quantization_config: dict[str, Any]) -> bool:
        """Whether a config.json quantization_config is in this format."""
        raise NotImplementedError

    def quantized_modules(self, tensor_names: set[str]) -> set[str]:
        """Names of the modules stored quantized, from the checkpoint's tensor names."""
        raise NotImplementedError

    def load_module(self, name: str, tensors: dict[str, torch.Tensor], quantization_config: dict[str, Any],
                    dtype: torch.dtype) -> nn.Module:
        """A runtime module from one module's tensors (keys relative: 'weight_packed', 'qweight', ...)."""
        raise NotImplementedError

    def config_of(self, name: str, module: nn.Module, quantization_config: dict[str, Any]) -> Any:
        """The QuantConfig a loaded module stands for, when config.json carries no quantkit recipe."""
        raise NotImplementedError

    def check_module_tensors(self, name: str, tensors: dict[str, torch.Tensor], quantization_config: dict[str, Any],
                             shape: tuple[int, int]) -> list[str]:
        """Every problem of one stored module (one line each, naming `name.key`): tensor names, shapes and dtypes
        against the format and `shape` (out, in features, from config.json), and its quantization parameters.

        This default loads the module (reporting the first error) and compares its shape; the built-in formats
        check without building the module and report every problem (`quantkit verify`).
        """
        try:
            module = self.load_module(name, tensors, quantization_config, torch.float32)
        except QuantkitError as e:
            return [str(e)]
        return shape_problems(name, (module.out_features, module.in_features), shape)


# -- checks shared by the formats -------------------------------------------------------------

class AffineFormat(QuantFormat):
    """A format storing AffineWeights (compressed-tensors, GPTQ): loading and checking go through `_stored_affine`
    (its tensors -> the weight, structural checks) and the qparams' sanity checks (affine_problems)."""

    qparam_keys: ClassVar[tuple[str, str, str]]  # the stored names of the scales, zero points and group map

    def _stored_affine(self, name: str, tensors: dict[str, torch.Tensor],
                       quantization_config: dict[str, Any]) -> AffineWeight:
        raise NotImplementedError

    def _padding_problems(self, name: str, tensors: dict[str, torch.Tensor], w: AffineWeight) -> list[str]:
        """Stray bits past the last value of each packed tensor."""
        return []

    def load_module(self, name: str, tensors: dict[str, torch.Tensor], quantization_config: dict[str, Any],
                    dtype: torch.dtype) -> nn.Module:
        w = self._stored_affine(name, tensors, quantization_config)
        raise_first(affine_problems(name, w, *self.qparam_keys))
        bias = check_tensor(name, "bias", tensors, (w.shape[0],), FLOAT_DTYPES) if "bias" in tensors else None
        return AffineLinear(w, bias, dtype=dtype)

    def check_module_tensors(self, name: str, tensors: dict[str, torch.Tensor], quantization_config: dict[str, Any],
                             shape: tuple[int, int]) -> list[str]:
        try:
            w = self._stored_affine(name, tensors, quantization_config)
            if "bias" in tensors:
                check_tensor(name, "bias", tensors, (w.shape[0],), FLOAT_DTYPES)
        except QuantkitError as e:
            return [str(e)]
        problems = shape_problems(name, w.shape, shape) + affine_problems(name, w, *self.qparam_keys)
        return problems + self._padding_problems(name, tensors, w)


def refuses_non_affine(module: nn.Module, format_name: str) -> str | None:
    """The reason an integer-affine format gives for any other module, or None for an AffineLinear."""
    if isinstance(module, AffineLinear):
        return None
    return (f"a {type(module).__name__} is not an integer-affine quantized linear: the {format_name} format "
            f"holds AffineLinear modules (int4, rtn, gptq, or a plugin's)")


def affine_of(name: str, module: nn.Module, fmt: QuantFormat) -> AffineWeight:
    """The canonical quantized weight of a module the format holds; a QuantkitError naming it otherwise."""
    reason = fmt.refuses_module(module)
    if reason is not None:
        raise QuantkitError(f"{name}: {reason}")
    return module.affine_weight()


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


def raise_first(problems: list[str]):
    """A module's problems, as load refuses them: the first one (verify lists them all)."""
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise QuantkitError(problems[0] + more)


def shape_problems(name: str, stored: tuple[int, int], expected: tuple[int, ...]) -> list[str]:
    """The stored (out, in) features against config.json's."""
    if tuple(stored) == tuple(expected):
        return []
    return [f"{name}: stores a {stored[0]}x{stored[1]} (out x in) weight but config.json implies "
            f"{expected[0]}x{expected[1]}: the checkpoint does not match its config.json; re-export it"]


def finite_problems(name: str, key: str, t: torch.Tensor, what: str, non_negative: bool) -> list[str]:
    """Values of tensor `key` that are NaN or infinite, or (non_negative) below zero."""
    t = t.float()
    problems = []
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        problems.append(f"{name}.{key}: {bad} of {t.numel()} {what} are NaN or infinite: re-export the model")
    low = int((t < 0).sum()) if non_negative else 0
    if low:
        problems.append(f"{name}.{key}: {low} of {t.numel()} {what} are negative: re-export the model")
    return problems


def affine_problems(name: str, w: AffineWeight, scale_key: str, zero_key: str, g_idx_key: str) -> list[str]:
    """The quantization parameters of a stored affine weight: scales finite and not negative (0: a group of zero
    weights, as GPTQ leaves dead inputs), symmetric zero points at 2^(bits-1) (unpacked zero points are in
    [0, 2^bits) by construction), g_idx a map onto whole groups."""
    problems = finite_problems(name, scale_key, w.scale, "scales", non_negative=True)
    if w.symmetric:
        off = int((w.zero != 2 ** (w.bits - 1)).sum())
        if off:
            problems.append(f"{name}.{zero_key}: the scheme is symmetric but {off} zero point(s) are not "
                            f"2^(bits-1) = {2 ** (w.bits - 1)}: re-export the model")
    if w.g_idx is not None:
        problems += group_map_problems(name, g_idx_key, w.g_idx, w.shape[1], w.group_size)
    return problems


def group_map_problems(name: str, key: str, g_idx: torch.Tensor, k: int, group_size: int) -> list[str]:
    """An act-order g_idx must use each group as often as the trivial map (column // group_size) does."""
    groups = -(-k // group_size)
    want = torch.bincount(torch.arange(k) // group_size, minlength=groups)
    got = torch.bincount(g_idx.long().clamp(0, groups - 1), minlength=groups)
    if torch.equal(got, want):
        return []
    group = int((got != want).nonzero()[0])
    return [f"{name}.{key}: not a group map: group {group} has {int(got[group])} columns, expected "
            f"{int(want[group])} (group size {group_size}): re-export the model"]


def padding_problems(name: str, key: str, packed: torch.Tensor, bits: int, n: int, dim: int) -> list[str]:
    """Bits past the last value of each packed row must be zero, as pack writes them."""
    if n * bits % 32 == 0 or torch.equal(pack(unpack(packed, bits, n, dim), bits, dim), packed):
        return []
    return [f"{name}.{key}: nonzero bits past the last packed value: the tensor is corrupt; re-export the model"]


def check_known(name: str, tensors: dict[str, torch.Tensor], known: tuple[str, ...]):
    """Refuse tensors the format does not define (e.g. input_scale of activation quantization)."""
    unknown = sorted(set(tensors) - set(known))
    if unknown:
        raise QuantkitError(f"{name}: unexpected tensor(s) {', '.join(unknown)}: this checkpoint uses features "
                            f"quantkit does not read (activation quantization?)")
