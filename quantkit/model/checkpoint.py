"""Hugging Face checkpoint I/O: lazy, memory-mapped, one tensor (or one decoder layer) at a time.

`Checkpoint` indexes a directory (model.safetensors, sharded safetensors with
model.safetensors.index.json, or pytorch_model*.bin) without reading tensor data, validates every
shape against config.json up front, and hands out tensors by name or a decoder layer at a time:
the streaming quantization pipeline reads a 70B checkpoint through it one layer at a time.

This module knows dense checkpoints only; quantized ones are read by `quantkit.loading`, which
subclasses `Checkpoint` with the formats' knowledge of which modules are stored quantized (the
native model sits below the quantization code).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.io import atomic_dir
from quantkit.dtypes import DTYPES, dtype_name, parse_dtype
from quantkit.model.config import LlamaConfig
from quantkit.model.layout import checkpoint_shapes, layer_index, layer_prefix
from quantkit.model.llama import LlamaDecoderLayer, LlamaForCausalLM
from quantkit.model.shards import SAFETENSORS_INDEX, SAFETENSORS_SINGLE, write_safetensors

log = logging.getLogger(__name__)

BIN_SINGLE, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json",
                   "generation_config.json")
IGNORED_TENSORS = re.compile(r"rotary_emb\.inv_freq$")  # saved by old transformers, recomputed here


def resolve_model_dir(path_or_id: str | os.PathLike) -> Path:
    """A local directory as is; a hub id ('meta-llama/Llama-2-7b-hf') through huggingface_hub."""
    path = Path(path_or_id)
    if path.is_dir():
        return path
    if path.exists():
        raise QuantkitError(f"{path}: is a file, not a model directory: pass the directory holding config.json")
    text = str(path_or_id)
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text) is None:
        raise QuantkitError(f"{path}: no such model directory: pass a directory holding config.json")
    return _download(text)


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise QuantkitError(f"{repo_id}: no such directory, and huggingface_hub is not installed to fetch it "
                            f"from the hub: pass a local directory") from None
    patterns = ["*.json", "*.safetensors", "tokenizer.model"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # network, auth and not-found errors all mean the same thing to the user
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QuantkitError(f"{repo_id}: no such directory, and the Hugging Face hub could not provide it "
                            f"({reason}): download it elsewhere and pass a local directory") from None


class Checkpoint:
    """Name-addressed, lazy access to a Hugging Face Llama checkpoint directory."""

    def __init__(self, path: str | os.PathLike):
        self.dir = resolve_model_dir(path)
        self.config = LlamaConfig.from_file(self.dir / "config.json")
        self.shapes = checkpoint_shapes(self.config)  # tensor name -> shape, in model order
        self.weight_map = self._index()  # tensor name -> file name
        self.quantization_config = self.config.extra.get("quantization_config")
        self.quantized_modules = self._stored_quantized()  # their tensors replace .weight/.bias
        for module in self.quantized_modules:
            self.shapes.pop(f"{module}.weight", None)
            self.shapes.pop(f"{module}.bias", None)
        self._validate()

    def _stored_quantized(self) -> set[str]:
        """Names of the modules stored quantized; a dense checkpoint has none (quantkit.loading reads the rest)."""
        if self.quantization_config:
            raise QuantkitError(f"{self.dir / 'config.json'}: the checkpoint is quantized "
                                f"({self.quantization_config.get('quant_method')}): read it with quantkit.load "
                                f"or quantkit.loading.open_checkpoint")
        return set()

    def _is_quantized_tensor(self, name: str) -> bool:
        module = name
        while "." in module:
            module = module.rpartition(".")[0]
            if module in self.quantized_modules:
                return True
        return False

    # -- indexing ----------------------------------------------------------------------------

    def _index(self) -> dict[str, str]:
        for index_name, single in ((SAFETENSORS_INDEX, SAFETENSORS_SINGLE), (BIN_INDEX, BIN_SINGLE)):
            index_path = self.dir / index_name
            if index_path.is_file():
                return self._read_index(index_path)
            if (self.dir / single).is_file():
                return {name: single for name in self._file_keys(single)}
        raise QuantkitError(f"{self.dir}: no weights ({SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX} or {BIN_SINGLE}): "
                            f"pass a complete Hugging Face model directory")

    def _read_index(self, index_path: Path) -> dict[str, str]:
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise QuantkitError(f"{index_path}: not a valid index ({e!r}): restore the file") from None
        for shard in sorted(set(weight_map.values())):
            if not (self.dir / shard).is_file():
                raise QuantkitError(f"{self.dir / shard}: shard named in {index_path.name} is missing: "
                                    f"download the complete checkpoint")
        return weight_map

    def _file_keys(self, file_name: str) -> list[str]:
        if file_name.endswith(".safetensors"):
            with self._open_safetensors(file_name) as f:
                return list(f.keys())
        return list(self._load_bin(file_name))

    def _open_safetensors(self, file_name: str):
        path = self.dir / file_name
        try:
            return safe_open(path, framework="pt")
        except (SafetensorError, OSError) as e:
            raise QuantkitError(f"{path}: truncated or corrupt safetensors file ({e}): download it again") from None

    def _load_bin(self, file_name: str) -> dict[str, torch.Tensor]:
        path = self.dir / file_name
        try:  # weights_only: a pickle may not run code; mmap: tensors are paged in on use
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError... for a bad file
            raise QuantkitError(f"{path}: unreadable PyTorch checkpoint ({type(e).__name__}): download it "
                                f"again or convert it to safetensors") from None

    def _validate(self):
        """Every expected tensor present with the shape config.json implies, before any data is read."""
        expected = self.shapes
        missing = [n for n in expected if n not in self.weight_map]
        if missing:
            raise QuantkitError(f"{self.dir}: tensor {missing[0]} is missing ({len(missing)} missing in all): "
                                f"the checkpoint is incomplete or not a Llama model")
        unexpected = [n for n in self.weight_map if n not in expected and not IGNORED_TENSORS.search(n)
                      and not self._is_quantized_tensor(n)]
        if unexpected and not (self.config.tie_word_embeddings and unexpected == ["lm_head.weight"]):
            raise QuantkitError(f"{self.dir / self.weight_map[unexpected[0]]}: unexpected tensor {unexpected[0]} "
                                f"for this config.json: is this a quantized or non-Llama checkpoint?")
        for file_name, names in self._names_by_file(expected).items():
            if file_name.endswith(".safetensors"):
                with self._open_safetensors(file_name) as f:
                    present = set(f.keys())
                    for name in names:
                        if name not in present:
                            raise QuantkitError(f"{self.dir / file_name}: tensor {name} listed in the index is "
                                                f"not in the file: download the checkpoint again")
                        self._check_shape(name, tuple(f.get_slice(name).get_shape()), file_name)

    def _check_shape(self, name: str, shape: tuple[int, ...], file_name: str):
        want = self.shapes.get(name)
        if want is not None and shape != want:
            raise QuantkitError(f"{self.dir / file_name}: tensor {name} has shape {list(shape)} but config.json "
                                f"implies {list(want)}: the config does not belong to these weights")

    def _names_by_file(self, names: Iterable[str]) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = defaultdict(list)
        for name in names:
            groups[self.weight_map[name]].append(name)
        return groups

    # -- reading -----------------------------------------------------------------------------

    def default_dtype(self) -> torch.dtype:
        return DTYPES.get(self.config.torch_dtype, torch.float16)

    def read(self, names: Iterable[str], dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) for the given names, opening each file once, converting to dtype."""
        for file_name, group in self._names_by_file(names).items():
            if file_name.endswith(".safetensors"):
                with self._open_safetensors(file_name) as f:
                    for name in group:
                        yield name, _cast(f.get_tensor(name), dtype)
            else:
                tensors = self._load_bin(file_name)
                for name in group:
                    t = tensors[name]
                    self._check_shape(name, tuple(t.shape), file_name)
                    yield name, _cast(t, dtype)

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if name not in self.weight_map:
            raise QuantkitError(f"{self.dir}: no tensor named {name}")
        return next(self.read([name], dtype))[1]

    def layer_names(self, index: int) -> list[str]:
        return [n for n in self.shapes if n.startswith(layer_prefix(index))]

    def layer(self, index: int, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """One decoder layer's tensors keyed relative to the layer ('mlp.down_proj.weight'); nothing else is read."""
        if not 0 <= index < self.config.num_hidden_layers:
            raise QuantkitError(f"layer {index} out of range: the model has {self.config.num_hidden_layers} layers")
        prefix = layer_prefix(index)
        return {name[len(prefix):]: t for name, t in self.read(self.layer_names(index), dtype)}

    def layer_module(self, index: int, dtype: torch.dtype | None = None) -> LlamaDecoderLayer:
        """Decoder layer `index` as a module holding only its own weights."""
        with torch.device("meta"):
            layer = LlamaDecoderLayer(self.config, index)
        for name, t in self.layer(index, dtype or self.default_dtype()).items():
            _set_tensor(layer, name, t)
        return layer.eval().requires_grad_(False)

    def layers(self, dtype: torch.dtype | None = None) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        for index in range(self.config.num_hidden_layers):
            yield index, self.layer(index, dtype)

    def module_tensors(self, module: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """A quantized module's stored tensors, keyed relative to the module ('weight_packed', ...)."""
        names = [n for n in self.weight_map if n.startswith(module + ".") and self._is_quantized_tensor(n)]
        return {name[len(module) + 1:]: t for name, t in self.read(names, dtype)}

    def non_layer_names(self) -> list[str]:
        """Embedding, final norm and lm_head: what surrounds the decoder layers."""
        return [n for n in self.shapes if layer_index(n) is None]


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Float tensors to dtype; integer (packed, quantized) tensors stay as stored."""
    return t if dtype is None or t.dtype == dtype or not t.is_floating_point() else t.to(dtype)


def check_device(device: str | torch.device) -> torch.device:
    """The device, if this machine has it: a missing CUDA is one clear error, not torch's assertion."""
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise QuantkitError(f"--device {device}: not a device ({e}): use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise QuantkitError(f"--device {device}: this machine has no CUDA device (torch {torch.__version__}): "
                            f"use --device cpu")
    return device


def build_model(ckpt: Checkpoint, dtype: torch.dtype, device: torch.device) -> LlamaForCausalLM:
    """The model on the meta device, filled tensor by tensor from `ckpt.shapes` (never two copies in memory).

    Modules stored quantized stay on the meta device: quantkit.loading puts their runtime modules in.
    """
    with torch.device("meta"):
        model = LlamaForCausalLM(ckpt.config)
    for name, t in ckpt.read(ckpt.shapes, dtype):
        _set_tensor(model, name, t.to(device))
    model.source_dir = ckpt.dir
    return model


def ready_for_inference(model: LlamaForCausalLM) -> LlamaForCausalLM:
    model.tie_weights()
    return model.eval().requires_grad_(False)


def load_model(path: str | os.PathLike, dtype=None, device: str | torch.device = "cpu") -> LlamaForCausalLM:
    """A dense checkpoint as a native model (quantized ones: quantkit.load)."""
    device = check_device(device)
    ckpt = Checkpoint(path)
    return ready_for_inference(build_model(ckpt, parse_dtype(dtype) or ckpt.default_dtype(), device))


def _set_tensor(model: nn.Module, name: str, t: torch.Tensor):
    module_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(module_name), leaf, nn.Parameter(t, requires_grad=False))


# -- saving ---------------------------------------------------------------------------------------

def copy_tokenizer_files(src_dir: Path | None, out_dir: Path):
    if src_dir is None:
        return
    for name in TOKENIZER_FILES:
        if (Path(src_dir) / name).is_file():
            shutil.copy2(Path(src_dir) / name, out_dir / name)


def save_model(model: LlamaForCausalLM, out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
               max_shard_size: int | str = "5GB", dtype=None, overwrite: bool = False) -> Path:
    """Save in Hugging Face's layout: config.json, safetensors (sharded with an index), tokenizer files."""
    dtype = parse_dtype(dtype)
    config = model.config
    tensors = {k: _cast(v, dtype) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # as transformers does: the embedding is the lm_head
    saved_dtype = dtype or model.model.embed_tokens.weight.dtype  # what the files hold, not what config said
    config = dataclasses.replace(config, torch_dtype=dtype_name(saved_dtype))
    tokenizer_dir = tokenizer_dir if tokenizer_dir is not None else getattr(model, "source_dir", None)
    with atomic_dir(out_dir, overwrite, keep=[tokenizer_dir]) as tmp:
        write_safetensors(tensors, tmp, max_shard_size)
        (tmp / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
        copy_tokenizer_files(tokenizer_dir, tmp)
    log.info("saved %d tensors to %s", len(tensors), out_dir)
    return Path(out_dir)
