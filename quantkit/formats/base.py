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

import json
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from quantkit.affine import AffineWeight
from quantkit.dtypes import dtype_name
from quantkit.errors import QuantkitError
from quantkit.model.checkpoint import copy_tokenizer_files
from quantkit.model.shards import ShardWriter
from quantkit.modules import AffineLinear
from quantkit.record import ERRORS_FILE


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

    def open_sink(self, directory: Path, max_shard_size: int | str, metadata: dict[str, str]):
        """Where the tensors go as they are produced: an object with add(name, tensor), close() and total_size."""
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


# -- checks shared by the formats -------------------------------------------------------------

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


def check_known(name: str, tensors: dict[str, torch.Tensor], known: tuple[str, ...]):
    """Refuse tensors the format does not define (e.g. input_scale of activation quantization)."""
    unknown = sorted(set(tensors) - set(known))
    if unknown:
        raise QuantkitError(f"{name}: unexpected tensor(s) {', '.join(unknown)}: this checkpoint uses features "
                            f"quantkit does not read (activation quantization?)")
