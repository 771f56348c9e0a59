"""Hugging Face checkpoint I/O: lazy, memory-mapped, one tensor (or one decoder layer) at a time.

`Checkpoint` indexes a directory (model.safetensors, sharded safetensors with
model.safetensors.index.json, or pytorch_model*.bin) without reading tensor data, validates every
shape against config.json up front, and hands out tensors by name or a decoder layer at a time:
the streaming quantization pipeline reads a 70B checkpoint through it one layer at a time.

Beside it: hub.py (where a directory comes from, and the rule for the files it names), build.py (the native
model from a Checkpoint), save.py (writing one). This module knows dense checkpoints only; quantized ones are
read by `quantkit.formats.reader`, which subclasses `Checkpoint` with the formats' knowledge of which modules
are stored quantized (the native model sits below the quantization code).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.io.manifest import check_intact
from quantkit.dtypes import DTYPES, FLOAT_DTYPES, ST_CODES, ST_DTYPES, dtype_name, short_name
from quantkit.model.config import LlamaConfig, printable, shown
from quantkit.model.layout import checkpoint_shapes, layer_index, layer_prefix
from quantkit.model.hub import confined_path, resolve_model_dir
from quantkit.model.llama import LlamaDecoderLayer, indivisible_dims
from quantkit.io.shards import SAFETENSORS_INDEX, SAFETENSORS_SINGLE

log = logging.getLogger(__name__)

BIN_SINGLE, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
IGNORED_TENSORS = re.compile(r"rotary_emb\.inv_freq$")  # saved by old transformers, recomputed here


COMPUTE_CODES = tuple(ST_DTYPES[d] for d in FLOAT_DTYPES)  # the stored dtypes a dense weight may have
# What safetensors 0.8 raises for a corrupt file (tests/model/test_fuzz_inputs.py finds no other), or the OS
# for one it cannot read.
SAFETENSORS_ERRORS = (SafetensorError, OSError)


class Checkpoint:
    """Name-addressed, lazy access to a Hugging Face Llama checkpoint directory.

    Construction reads config.json and the tensor headers only (no tensor data, except to compare a
    stored lm_head with the embedding it is tied to): config.json keys it does not state are taken from
    the stored shapes, stated ones that disagree with them are errors (vocab_size: a warning, the
    stored value wins), and the dtype is config.json's or else the stored one, as transformers does.
    """

    def __init__(self, path: str | os.PathLike):
        self.dir = resolve_model_dir(path)
        check_intact(self.dir, hashes=False)  # sizes against quantkit's manifest (a truncated file), before any read
        self.config_path = self.dir / "config.json"
        config = LlamaConfig.from_file(self.config_path)
        self.quantization_config = config.extra.get("quantization_config")
        if self.quantization_config is not None and not isinstance(self.quantization_config, dict):
            raise QuantkitError(f"{self.config_path}: quantization_config is {shown(self.quantization_config)}: "
                                f"it must be an object (or absent, for a dense checkpoint)")
        self.weights_source: Path | None = None  # the file the weight map comes from (a shard index or the file)
        self.weight_map = self._index()  # tensor name -> file name
        self.quantized_modules = self._stored_quantized()  # their tensors replace .weight/.bias
        self.stored = self._read_headers()  # tensor name -> (shape, safetensors dtype code), headers only
        self.config = self._reconcile(config)
        self.shapes = checkpoint_shapes(self.config)  # tensor name -> shape, in model order
        for module in self.quantized_modules:
            self.shapes.pop(f"{module}.weight", None)
            self.shapes.pop(f"{module}.bias", None)
        self._validate()
        self.stored_dtype = self._stored_dtype()
        self._log_dtype_choice()
        self._check_tied_head()

    def _stored_quantized(self) -> set[str]:
        """Names of the modules stored quantized; a dense checkpoint has none (quantkit.formats.reader reads the rest)."""
        if self.quantization_config:
            raise QuantkitError(f"{self.dir / 'config.json'}: the checkpoint is quantized "
                                f"({self.quantization_config.get('quant_method')}): read it with quantkit.load "
                                f"or quantkit.formats.reader.open_checkpoint")
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
        """transformers' order: model.safetensors, its index, pytorch_model.bin, its index."""
        for single, index_name in ((SAFETENSORS_SINGLE, SAFETENSORS_INDEX), (BIN_SINGLE, BIN_INDEX)):
            if (self.dir / single).is_file() or (self.dir / single).is_symlink():  # a broken link: said below
                if (self.dir / index_name).is_file():
                    log.warning("%s: both %s and %s exist: reading %s, as transformers does (the index is "
                                "ignored; delete whichever is stale)", self.dir, single, index_name, single)
                confined_path(self.dir, single, self.dir)
                self.weights_source = self.dir / single
                return {name: single for name in self._file_keys(single)}
            if (self.dir / index_name).is_file():
                self.weights_source = self.dir / index_name
                return self._read_index(self.dir / index_name)
        raise QuantkitError(f"{self.dir}: no weights ({SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX} or {BIN_SINGLE}): "
                            f"pass a complete Hugging Face model directory")

    def _read_index(self, index_path: Path) -> dict[str, str]:
        try:
            index = json.loads(index_path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise QuantkitError(f"{index_path}: not valid JSON ({reason}): restore the file") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise QuantkitError(f"{index_path}: not a valid index (no weight_map object naming each tensor's "
                                f"file): restore the file")
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or not shard:
                raise QuantkitError(f"{index_path}: weight_map entry {shown(name)} is {shown(shard)}: it must "
                                    f"be a file name: restore the file")
        suffix = ".safetensors" if index_path.name == SAFETENSORS_INDEX else ".bin"
        for shard in sorted(set(weight_map.values())):
            path = confined_path(self.dir, shard, index_path)  # inside the directory, before anything is opened
            if not shard.endswith(suffix):
                raise QuantkitError(f"{index_path}: weight_map names {shown(shard)}, not a {suffix} file: "
                                    f"restore the file")
            if not path.is_file():
                raise QuantkitError(f"{printable(str(self.dir / shard))}: shard named in {index_path.name} is missing: "
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
        except SAFETENSORS_ERRORS as e:
            raise QuantkitError(f"{path}: truncated or corrupt safetensors file ({_reason(e)}): "
                                f"download it again") from None

    def _load_bin(self, file_name: str) -> dict[str, torch.Tensor]:
        path = self.dir / file_name
        try:  # weights_only: a pickle may not run code; mmap: tensors are paged in on use
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError:  # what weights_only raises for anything but tensors and plain containers
            raise QuantkitError(f"{path}: the pickle holds objects other than tensors, which quantkit does not "
                                f"load (it could run code): convert it to safetensors where you trust it") from None
        except Exception as e:  # torch raises RuntimeError, EOFError, zipfile errors... for a bad file
            raise QuantkitError(f"{path}: unreadable PyTorch checkpoint ({type(e).__name__}): download it "
                                f"again or convert it to safetensors") from None
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in state.items()):
            raise QuantkitError(f"{path}: not a state dict (names to tensors): save model.state_dict()")
        return state

    def _read_headers(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """(shape, safetensors dtype code) of every tensor in the weight map: safetensors headers only."""
        stored = {}
        for file_name, names in self._names_by_file(self.weight_map).items():
            if file_name.endswith(".safetensors"):
                with self._open_safetensors(file_name) as f:
                    present = set(f.keys())
                    for name in names:
                        if name not in present:
                            raise QuantkitError(f"{self.dir / file_name}: tensor {printable(name)} listed in the "
                                                f"index is not in the file: download the checkpoint again")
                        info = f.get_slice(name)
                        stored[name] = (tuple(info.get_shape()), info.get_dtype())
            else:
                tensors = self._load_bin(file_name)
                for name in names:
                    if name not in tensors:
                        raise QuantkitError(f"{self.dir / file_name}: tensor {printable(name)} listed in the "
                                            f"index is not in the file: download the checkpoint again")
                    t = tensors[name]
                    stored[name] = (tuple(t.shape), ST_DTYPES.get(t.dtype, dtype_name(t.dtype)))
        return stored

    # -- config.json against the stored tensors ------------------------------------------------

    def _dense_shape(self, name: str, ndim: int = 2) -> tuple[int, ...] | None:
        """The stored shape of a dense (not quantized) tensor, if stored with that many dimensions."""
        if name not in self.stored or self._is_quantized_tensor(name):
            return None
        shape = self.stored[name][0]
        return shape if len(shape) == ndim else None

    def _evidence(self, name: str) -> str:
        return f"{name} in {self.weight_map[name]} is {list(self.stored[name][0])}"

    def _implied_shapes(self, config: LlamaConfig) -> dict[str, tuple[int, str]]:
        """key -> (value, evidence) for the shape keys the stored tensors determine (not num_key_value_heads)."""
        implied = {}
        embed, head = self._dense_shape("model.embed_tokens.weight"), self._dense_shape("lm_head.weight")
        if embed is not None:
            implied["hidden_size"] = (embed[1], self._evidence("model.embed_tokens.weight"))
            if head is None or head[0] == embed[0] or config.tie_word_embeddings:
                implied["vocab_size"] = (embed[0], self._evidence("model.embed_tokens.weight"))
        gate = self._dense_shape(layer_prefix(0) + "mlp.gate_proj.weight")
        if gate is not None:
            implied["intermediate_size"] = (gate[0], self._evidence(layer_prefix(0) + "mlp.gate_proj.weight"))
        layers = {layer_index(n) for n in self.weight_map} - {None}
        if layers:
            top = max(layers)
            if top + 1 != len(layers):  # a gap; found without a range as long as a hostile index's top layer
                gap = next(i for i in range(len(layers) + 1) if i not in layers)
                raise QuantkitError(f"{self.weights_source}: no tensors for decoder layer {gap} (the files "
                                    f"have layers up to {top}): the checkpoint is incomplete")
            implied["num_hidden_layers"] = (top + 1, f"{self.weights_source.name} names layers 0-{top}")
        return implied

    def _reconcile(self, config: LlamaConfig) -> LlamaConfig:
        """config.json with its unstated shape keys (and a stated vocab_size the tensors contradict) taken from
        the stored tensors; any other stated key the tensors contradict is an error."""
        changes = self._agree(config, self._implied_shapes(config))
        if "hidden_size" in changes and "head_dim" not in config.stated:
            changes["head_dim"] = None  # derived again from the stored hidden_size
        if "num_key_value_heads" not in config.stated:
            changes["num_key_value_heads"] = None
        config = self._replace(config, changes)
        k_proj = self._dense_shape(layer_prefix(0) + "self_attn.k_proj.weight")
        if k_proj is not None and k_proj[0] % config.head_dim == 0:
            evidence = f"{self._evidence(layer_prefix(0) + 'self_attn.k_proj.weight')}, head_dim {config.head_dim}"
            implied = {"num_key_value_heads": (k_proj[0] // config.head_dim, evidence)}
            config = self._replace(config, self._agree(config, implied))
        for key, bias in (("attention_bias", "self_attn.q_proj.bias"), ("mlp_bias", "mlp.gate_proj.bias")):
            if getattr(config, key) and config.num_hidden_layers and layer_prefix(0) + bias not in self.weight_map:
                raise QuantkitError(f"{self.config_path}: {key} is true but {self.weights_source.name} stores no "
                                    f"{layer_prefix(0)}{bias}: set {key} to false")
        tp = config.pretraining_tp
        if tp > 1 and indivisible_dims(config, tp):
            raise QuantkitError(f"{self.config_path}: pretraining_tp is {tp}, which does not divide "
                                f"{', '.join(indivisible_dims(config, tp))}: set it to 1 (transformers 5 ignores it)")
        return config

    def _agree(self, config: LlamaConfig, implied: dict[str, tuple[int, str]]) -> dict[str, int]:
        changes = {}
        for key, (value, evidence) in implied.items():
            current = getattr(config, key)
            if value == current:
                continue
            if key not in config.stated:
                log.warning("%s states no %s: using %d from the stored tensors (%s), not the default %d",
                            self.config_path, key, value, evidence, current)
            elif key == "vocab_size":
                log.warning("%s says vocab_size=%d but the stored tensors have %d rows (%s): using %d, which the "
                            "output's config.json will state", self.config_path, current, value, evidence, value)
            else:
                raise QuantkitError(f"{self.config_path}: {key} is {current} but the stored tensors imply {value} "
                                    f"({evidence}): the config does not belong to these weights")
            changes[key] = value
        return changes

    def _replace(self, config: LlamaConfig, changes: dict) -> LlamaConfig:
        try:
            return dataclasses.replace(config, **changes) if changes else config
        except QuantkitError as e:  # e.g. a stored hidden_size that config.json's head count does not divide
            raise QuantkitError(f"{self.config_path} with the stored shapes: {e}") from None

    def _validate(self):
        """Every expected tensor present with the shape config.json implies, before any data is read."""
        expected = self.shapes
        missing = [n for n in expected if n not in self.weight_map]
        if missing == ["lm_head.weight"] and not any(n.startswith("lm_head.") for n in self.weight_map):
            raise QuantkitError(f"{self.config_path}: tie_word_embeddings is false (or absent) but the checkpoint "
                                f"stores no lm_head.weight: set \"tie_word_embeddings\": true if the embedding "
                                f"is also the lm_head")
        if missing:
            raise QuantkitError(f"{self.weights_source}: tensor {missing[0]} is missing ({len(missing)} missing in "
                                f"all): the checkpoint is incomplete or not a Llama model")
        unexpected = [n for n in self.weight_map if n not in expected and not IGNORED_TENSORS.search(n)
                      and not self._is_quantized_tensor(n)]
        if unexpected and not (self.config.tie_word_embeddings and unexpected == ["lm_head.weight"]):
            raise QuantkitError(f"{self.dir / self.weight_map[unexpected[0]]}: unexpected tensor "
                                f"{printable(unexpected[0])} "
                                f"for this config.json: is this a quantized or non-Llama checkpoint?")
        for name in expected:
            shape, code = self.stored[name]
            self._check_shape(name, shape, self.weight_map[name])
            if code not in COMPUTE_CODES:
                raise QuantkitError(f"{self.dir / self.weight_map[name]}: tensor {name} is stored as {code}: "
                                    f"quantkit reads {', '.join(COMPUTE_CODES)} weights (a quantized checkpoint "
                                    f"needs its quantization_config in config.json)")

    def _check_shape(self, name: str, shape: tuple[int, ...], file_name: str):
        want = self.shapes.get(name)
        if want is not None and shape != want:
            raise QuantkitError(f"{self.dir / file_name}: tensor {name} has shape {list(shape)} but config.json "
                                f"implies {list(want)}: the config does not belong to these weights")

    def _stored_dtype(self) -> torch.dtype:
        """The dense tensors' stored dtype; for a mix (some bf16, some fp16), float32, which holds each exactly:
        one dtype that would round some of them (fp16 overflows past 65504, bf16 drops mantissa) is never chosen."""
        codes = Counter(self.stored[n][1] for n in self.shapes)
        if not codes:
            return torch.float16
        if len(codes) > 1:
            mix = ", ".join(f"{dtype_name(ST_CODES[code])}: {n} tensors" for code, n in codes.most_common())
            log.warning("%s: the weights are stored in a mix of dtypes (%s): using float32, which holds each "
                        "exactly; pass --dtype to choose another", self.weights_source, mix)
            return torch.float32
        return ST_CODES[next(iter(codes))]

    def _log_dtype_choice(self):
        stated, stored = self.config.torch_dtype, dtype_name(self.stored_dtype)
        if stated is None:
            log.info("%s states no dtype: using the stored %s", self.config_path, stored)
        elif stated != stored:
            log.warning("%s says torch_dtype=%s but the weights are stored as %s: computing in %s as transformers "
                        "does; pass --dtype %s to keep the stored precision", self.config_path, stated, stored,
                        stated, short_name(self.stored_dtype))

    def _check_tied_head(self):
        """A stored lm_head.weight that tie_word_embeddings replaces by the embedding: fine if they are equal."""
        if not self.config.tie_word_embeddings or self._dense_shape("lm_head.weight") is None:
            return
        embed = self.tensor("model.embed_tokens.weight")
        head = next(self.read(["lm_head.weight"]))[1]
        if head.shape != embed.shape or not torch.equal(head.to(embed.dtype), embed):
            log.warning("%s sets tie_word_embeddings=true but %s stores its own lm_head.weight (different from "
                        "embed_tokens.weight): tying them as transformers does; set tie_word_embeddings to false "
                        "to use the stored lm_head", self.config_path, self.weight_map["lm_head.weight"])

    def _names_by_file(self, names: Iterable[str]) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = defaultdict(list)
        for name in names:
            groups[self.weight_map[name]].append(name)
        return groups

    # -- reading -----------------------------------------------------------------------------

    def default_dtype(self) -> torch.dtype:
        """The dtype to compute in: config.json's if it states one (as transformers does), else the stored one."""
        return DTYPES[self.config.torch_dtype] if self.config.torch_dtype is not None else self.stored_dtype

    def output_dtype(self) -> torch.dtype:
        """The dtype to write unquantized tensors in when the user names none: the stored one, unchanged."""
        return self.stored_dtype

    def read(self, names: Iterable[str], dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) for the given names, opening each file once, converting to dtype."""
        for file_name, group in self._names_by_file(names).items():
            if file_name.endswith(".safetensors"):
                with self._open_safetensors(file_name) as f:
                    for name in group:
                        yield name, _cast_checked(name, f.get_tensor(name), dtype)
            else:
                tensors = self._load_bin(file_name)
                for name in group:
                    t = tensors[name]
                    self._check_shape(name, tuple(t.shape), file_name)
                    yield name, _cast_checked(name, t, dtype)

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
            set_tensor(layer, name, t)
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


def _reason(e: Exception) -> str:
    """An exception's first line, for a one-line message."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def _cast_checked(name: str, t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """_cast, refusing a cast to a smaller range that turns finite values into inf (bf16's 1e6 in fp16)."""
    out = cast_float(t, dtype)
    if out is not t and torch.finfo(dtype).max < torch.finfo(t.dtype).max and not bool(torch.isfinite(out).all()) \
            and bool(torch.isfinite(t).all()):
        raise QuantkitError(f"{name}: its {dtype_name(t.dtype)} values exceed {dtype_name(dtype)}'s range "
                            f"({torch.finfo(dtype).max:g}) and would be written as inf: pass --dtype "
                            f"{short_name(t.dtype)} (or fp32)")
    return out


def cast_float(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Float tensors to dtype; integer (packed, quantized) tensors stay as stored."""
    return t if dtype is None or t.dtype == dtype or not t.is_floating_point() else t.to(dtype)



def set_tensor(model: nn.Module, name: str, t: torch.Tensor):
    module_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(module_name), leaf, nn.Parameter(t, requires_grad=False))
