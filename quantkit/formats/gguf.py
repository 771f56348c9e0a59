"""GGUF (llama.cpp's file format) blocks for quantkit's affine weights, with no second rounding.

llama.cpp's legacy block types cut each row into blocks of 32 weights (ggml's QK4_0 = QK4_1 = QK8_0 = 32), each with an
fp16 scale d (and, for Q4_1, an fp16 minimum m); their block geometry is gguf's GGML_QUANT_SIZES:

  Q4_0 (18 bytes): d, then 16 bytes of nibbles: byte j holds weight j (low nibble) and weight j + 16 (high); w = d (q - 8)
  Q4_1 (20 bytes): d, m, then the nibbles as Q4_0;                                            w = d q + m
  Q8_0 (34 bytes): d, then 32 int8;                                                             w = d q

quantkit's weights are w = s (q - z) with q unsigned (quantkit.quant.affine), so, per (row, group of 32):
  4-bit symmetric (z = 8)  -> Q4_0 with the same q and d = s;
  4-bit asymmetric         -> Q4_1 with the same q, d = s and m = -s z (m's fp16 rounding is the one change);
  8-bit symmetric (z = 128) -> Q8_0 with q - 128 and d = s.
d is s rounded to fp16 (exact where s is fp16 already: quantkit's fp16 exports). Any other scheme is refused with one
line naming what GGUF holds (`gguf_type`). Rows are the output channels: llama.cpp's converter permutes q_proj's and
k_proj's rows for its rotary embedding (`permute_rows`, as convert_hf_to_gguf.py's LlamaModel.permute), which moves
whole rows of blocks and changes no value. Decoding is gguf's own (gguf.quants.dequantize; tests check every type).

The metadata and vocabulary are what llama.cpp's convert_hf_to_gguf.py writes for a Llama 2 checkpoint (`add_llama`,
`add_vocabulary`), through gguf's own writer and vocabulary readers.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.formats.base import QuantFormat, affine_of, refuses_non_affine
from quantkit.io.files import atomic_new_file, check_output_dir
from quantkit.model.config import LlamaConfig
from quantkit.model.layout import is_decoder_linear
from quantkit.model.llama import LlamaForCausalLM
from quantkit.quant.affine import AffineWeight, affine_scheme, trivial_g_idx
from quantkit.quant.linear import AffineLinear

BLOCK = 32  # weights per block of every type quantkit writes (ggml's QK4_0, QK4_1, QK8_0)
HELD = {(4, True): "Q4_0", (4, False): "Q4_1", (8, True): "Q8_0"}  # (bits, symmetric) at group 32 -> ggml type
WHAT_GGUF_HOLDS = ("GGUF holds group size 32 at 4 bits symmetric (Q4_0) or asymmetric (Q4_1), or at 8 bits "
                   "symmetric (Q8_0)")


def import_gguf():
    """The gguf package (llama.cpp's own Python writer, reader and quantizer), or a QuantkitError saying how to get it."""
    try:
        import gguf
    except ImportError as e:
        raise QuantkitError(f"--format gguf needs the gguf package (llama.cpp's writer): pip install gguf ({e})") from e
    return gguf


def gguf_type_problem(bits: int, group_size: int, symmetric: bool, act_order: bool = False) -> str | None:
    """Why GGUF cannot hold this scheme without a second rounding (one line naming the flags that would work), or
    None."""
    if HELD.get((bits, symmetric)) is not None and group_size == BLOCK and not act_order:
        return None
    got = (f"{bits}-bit {'symmetric' if symmetric else 'asymmetric'} group size "
           f"{'per channel' if group_size == -1 else group_size}{' with act-order groups' if act_order else ''}")
    sym = "--sym" if bits == 8 or symmetric else "--sym or --asym"
    return (f"{got} cannot go into GGUF without a second rounding: {WHAT_GGUF_HOLDS}; quantize "
            f"with --bits {4 if bits != 8 else 8} --group-size 32 {sym}"
            f"{' and without --act-order (or with --static-groups)' if act_order else ''}, "
            f"e.g. quantkit quantize MODEL --method gptq --bits 4 --group-size 32 --sym --format gguf -o OUT.gguf")


def gguf_type(bits: int, group_size: int, symmetric: bool, act_order: bool = False, name: str = "weight"):
    """The GGMLQuantizationType that holds this scheme exactly; a QuantkitError naming what would work otherwise."""
    problem = gguf_type_problem(bits, group_size, symmetric, act_order)
    if problem is not None:
        raise QuantkitError(f"{name}: {problem}")
    return getattr(import_gguf().GGMLQuantizationType, HELD[(bits, symmetric)])


def fp16_bytes(x: torch.Tensor) -> np.ndarray:
    """x (N, G) rounded to fp16, as its 2 bytes each (N, G, 2) little-endian uint8."""
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(*x.shape, 2).numpy()


def nibbles(q: torch.Tensor) -> np.ndarray:
    """q (N, G, 32) in [0, 16) as ggml packs a 4-bit block: byte j = q[j] | q[j + 16] << 4 (N, G, 16) uint8."""
    q = q.to(torch.uint8)
    return (q[..., :BLOCK // 2] | (q[..., BLOCK // 2:] << 4)).numpy()


def gguf_blocks(w: AffineWeight, name: str = "weight") -> tuple[np.ndarray, object]:
    """(blocks (N, K / 32 * type size) uint8, its GGMLQuantizationType): w's integers and scales in ggml's blocks.

    QuantkitError (gguf_type's line) for a scheme GGUF cannot hold exactly, or where K is not a multiple of 32."""
    n, k = w.shape
    act_order = not trivial_g_idx(w.g_idx, w.group_size)
    qtype = gguf_type(w.bits, w.group_size, w.symmetric, act_order, name)
    if k % BLOCK:
        raise QuantkitError(f"{name}: {k} input columns are not a whole number of GGUF blocks of {BLOCK}")
    q = w.q.reshape(n, k // BLOCK, BLOCK)
    d = fp16_bytes(w.scale.float())
    if w.bits == 8:
        parts = [d, (q.to(torch.int16) - 128).to(torch.int8).numpy().view(np.uint8)]
    elif w.symmetric:
        parts = [d, nibbles(q)]
    else:
        parts = [d, fp16_bytes(-w.scale.float() * w.zero.float()), nibbles(q)]
    blocks = np.concatenate(parts, axis=-1).reshape(n, -1)
    return np.ascontiguousarray(blocks), qtype


def permute_rows(rows: np.ndarray, heads: int) -> np.ndarray:
    """q_proj's (heads) or k_proj's (kv heads: _permuted_heads) rows in llama.cpp's order for its rotary embedding:
    convert_hf_to_gguf.py's LlamaModel.permute, which undoes transformers' half-split permutation per head."""
    shape = rows.shape
    return rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


RECIPE_KEY = "quantkit.recipe"  # quantkit's recipe (JSON) in the file's metadata


def rope_problem(config: LlamaConfig) -> str | None:
    """Why llama.cpp would not apply this model's rotary embedding (it reads none or linear scaling), or None."""
    if config.rope_type in ("default", "linear"):
        return None
    return (f"rope_type {config.rope_type!r} has no GGUF encoding that llama.cpp applies to Llama (it reads none or "
            f"linear): export this model to another --format")


def add_llama(writer, config: LlamaConfig, file_type: int, recipe: dict[str, Any] | None = None):
    """The `llama.*` architecture keys and general keys convert_hf_to_gguf.py's LlamaModel writes, on a GGUFWriter."""
    gguf = import_gguf()
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if config.head_dim * config.num_attention_heads != config.hidden_size:  # as the converter: head_dim stated
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    if (problem := rope_problem(config)) is not None:
        raise QuantkitError(problem)
    if config.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(config.rope_factor)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if recipe is not None:
        writer.add_string(RECIPE_KEY, json.dumps(recipe, sort_keys=True))


def gguf_vocabulary(tokenizer_dir: Path, vocab_size: int):
    """(gguf.vocab.SentencePieceVocab, pieces, scores, token types) of tokenizer_dir's tokenizer.model (with
    added_tokens.json's tokens after them), padded to the model's vocab_size as the converter pads ("[PAD{i}]", score
    -10000, unused). QuantkitError where the directory has no sentencepiece tokenizer.model, or more tokens than the
    embedding rows."""
    gguf = import_gguf()
    model = Path(tokenizer_dir) / "tokenizer.model"
    if not model.is_file():
        raise QuantkitError(f"{tokenizer_dir}: no tokenizer.model: GGUF's Llama vocabulary is sentencepiece's pieces "
                            f"and scores (pass the model directory that has the Llama 2 tokenizer.model)")
    try:
        vocab = gguf.vocab.SentencePieceVocab(Path(tokenizer_dir))
    except (RuntimeError, ValueError, OSError) as e:
        raise QuantkitError(f"{model}: not a sentencepiece model llama.cpp can read ({e})") from e
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    if len(tokens) > vocab_size:
        raise QuantkitError(f"{model}: {len(tokens)} tokens for a model of {vocab_size} embedding rows: the tokenizer "
                            f"is not this model's")
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-10000.0)
        types.append(gguf.TokenType.UNUSED)
    return vocab, tokens, scores, types


def add_vocabulary(writer, tokenizer_dir: Path, vocab_size: int):
    """The vocabulary (gguf_vocabulary) and the special token ids and add_bos/add_eos from the tokenizer's config
    files (gguf.SpecialVocab) on a GGUFWriter, as convert_hf_to_gguf.py writes them for Llama 2."""
    gguf = import_gguf()
    vocab, tokens, scores, types = gguf_vocabulary(tokenizer_dir, vocab_size)
    writer.add_tokenizer_model(vocab.tokenizer_model)
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(Path(tokenizer_dir), n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def llama_problem(config: LlamaConfig, tokenizer_dir: Path | None) -> str | None:
    """Why a GGUF llama.cpp runs cannot hold this model (its rotary embedding, its tokenizer), or None."""
    if (problem := rope_problem(config)) is not None:
        return problem
    if tokenizer_dir is None:
        return "GGUF carries the model's vocabulary: give the directory with its sentencepiece tokenizer.model"
    try:
        gguf_vocabulary(tokenizer_dir, config.vocab_size)
    except QuantkitError as e:
        return str(e)
    return None


FLOAT_TYPES = {torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16"}
FILE_TYPES = {"Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "Q8_0": "MOSTLY_Q8_0", "F16": "MOSTLY_F16",
              "F32": "ALL_F32", "BF16": "MOSTLY_BF16"}


def float_tensor(t: torch.Tensor, name: str) -> tuple[np.ndarray, Any]:
    """(array, GGMLQuantizationType) of an unquantized tensor: a matrix in its own dtype (bf16 as its raw 16-bit
    words), a vector (the norms' weights, biases) in F32 as the converter writes them (exact: fp16 and bf16 widen
    without rounding)."""
    gguf = import_gguf()
    kind = FLOAT_TYPES.get(t.dtype)
    if kind is None:
        raise QuantkitError(f"{name}: a {t.dtype} tensor has no GGUF type: GGUF holds F16, BF16 and F32")
    t = t.detach().cpu().contiguous()
    if t.dim() <= 1:
        t, kind = t.float(), "F32"
    array = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
    return array, getattr(gguf.GGMLQuantizationType, kind)


def block_tensors(name: str, w: AffineWeight) -> dict[str, torch.Tensor]:
    """One quantized linear's blocks (gguf_blocks) as a uint8 tensor named for its type: `name.q4_0`, `name.q4_1` or
    `name.q8_0` (what the GGUF format exports and GGUFSink turns into `name.weight` of that type)."""
    blocks, qtype = gguf_blocks(w, name)
    return {f"{name}.{qtype.name.lower()}": torch.from_numpy(blocks)}


class GGUFSink:
    """The tensors of a Llama, in transformers' names as quantkit exports them, into one GGUF file (`path`) through
    gguf's GGUFWriter: blocks (`block_tensors`) keep their type, float tensors go in as float_tensor says, llama.cpp's
    names (gguf's TensorNameMap), q_proj's and k_proj's rows permuted (permute_rows), lm_head skipped where the
    embedding is tied. The data are spooled as they come to an anonymous file beside `path` (never in memory or /tmp:
    a 70B's would not fit); `finish` writes the header, the metadata and the vocabulary, then copies the data after
    them. The add / close / total_size of every format's sink."""

    def __init__(self, path: Path, config: LlamaConfig):
        gguf = import_gguf()
        self.path, self.config, self.total_size = Path(path), config, 0
        self.names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
        self.quantized = {t.name.lower(): t for t in map(gguf.GGMLQuantizationType.__getitem__, HELD.values())}
        self.types: list[str] = []  # of the quantized tensors, for the file type
        self.writer = gguf.GGUFWriter(None, "llama", use_temp_file=True)
        self.writer.temp_file = tempfile.TemporaryFile(dir=self.path.parent)  # GGUFWriter spools tensors there

    def add(self, name: str, tensor: torch.Tensor):
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            return
        module, _, suffix = name.rpartition(".")
        qtype = self.quantized.get(suffix)
        if qtype is not None:
            name, array = module + ".weight", tensor.numpy()
            self.types.append(qtype.name)
        else:
            array, qtype = float_tensor(tensor, name)
        gguf_name = self.names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise QuantkitError(f"{name}: no llama.cpp tensor name for it (GGUF holds Llama's own tensors only)")
        heads = _permuted_heads(name, self.config)
        array = np.ascontiguousarray(permute_rows(array, heads) if heads else array)
        self.writer.add_tensor(gguf_name, array, raw_dtype=qtype)
        self.total_size += array.nbytes

    def close(self) -> list[str]:
        return [self.path.name]

    def file_type(self):
        """llama.cpp's general.file_type: the most common quantized type, else the embedding's float type."""
        gguf = import_gguf()
        kinds = self.types or [self.writer.tensors[0]["token_embd.weight"].dtype.name]
        return getattr(gguf.LlamaFileType, FILE_TYPES[max(set(kinds), key=kinds.count)])

    def finish(self, tokenizer_dir: Path | None, recipe: dict[str, Any] | None):
        """Header, metadata (add_llama), vocabulary (add_vocabulary) and the spooled tensors, into `path`."""
        add_llama(self.writer, self.config, self.file_type(), recipe)
        if tokenizer_dir is not None:
            add_vocabulary(self.writer, Path(tokenizer_dir), self.config.vocab_size)
        self.writer.write_header_to_file(self.path)
        self.writer.write_kv_data_to_file()
        self.writer.write_tensors_to_file()
        self.writer.close()


def write_gguf(model: nn.Module, path: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
               recipe: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write a quantkit Llama to one .gguf file, atomically: AffineLinear weights as blocks (a scheme gguf_type
    holds), everything else as float_tensor says (so an unquantized model gives an F16, BF16 or F32 GGUF), the llama.*
    metadata and the vocabulary of `tokenizer_dir`, through GGUFSink. QuantkitError (one line) for a path that is a
    directory or exists (unless overwrite), a scheme GGUF cannot hold or a tokenizer it cannot carry; nothing is
    written then. (A quantized model also goes through quantkit.save_quantized(model, path, format="gguf").)"""
    path = Path(path)
    check_gguf_path(path)
    quantized = {name for name, m in model.named_modules() if isinstance(m, AffineLinear)}
    with atomic_new_file(path, overwrite, keep=[tokenizer_dir]) as tmp:
        sink = GGUFSink(tmp, model.config)
        for name, module in model.named_modules():
            if name in quantized:
                tensors = block_tensors(name, module.affine_weight())
            elif not any(name.startswith(q + ".") for q in quantized):
                tensors = {f"{name}.{key}": t for key, t in [*module.named_parameters(recurse=False),
                                                             *module.named_buffers(recurse=False)]
                           if key in ("weight", "bias")}
            else:
                tensors = {}
            for tensor_name, t in tensors.items():
                sink.add(tensor_name, t)
        sink.finish(Path(tokenizer_dir) if tokenizer_dir is not None else None, recipe)
    return path


def check_gguf_path(path: Path):
    """A GGUF output is one file named *.gguf (what quantkit.load and verify recognize): QuantkitError otherwise."""
    if path.is_dir():
        raise QuantkitError(f"{path}: is a directory: GGUF is one file; give a file name such as {path / 'model.gguf'}")
    if path.suffix != ".gguf":
        raise QuantkitError(f"{path}: a GGUF file's name ends in .gguf (quantkit load and verify know it by that): "
                            f"use {path.with_name(path.name + '.gguf')}")


def gguf_value(reader, key: str, default: Any = None) -> Any:
    """A scalar or string metadata value of a GGUFReader (default where the key is absent)."""
    gguf = import_gguf()
    f = reader.fields.get(key)
    if f is None:
        return default
    value = f.parts[f.data[0]]
    return bytes(value).decode() if f.types[0] == gguf.GGUFValueType.STRING else value.tolist()[0]


def config_of_gguf(reader, path: Path) -> LlamaConfig:
    """The LlamaConfig a GGUF's llama.* keys describe (add_llama's inverse); QuantkitError for another architecture."""
    arch = gguf_value(reader, "general.architecture")
    if arch != "llama":
        raise QuantkitError(f"{path}: a GGUF of architecture {arch!r}: quantkit reads Llama GGUFs only")
    key = lambda k, default=None: gguf_value(reader, f"llama.{k}", default)  # noqa: E731
    heads = key("attention.head_count")
    rope = {"rope_type": "linear", "rope_factor": key("rope.scaling.factor")} if key("rope.scaling.type") else {}
    embeddings = next(t for t in reader.tensors if t.name == "token_embd.weight")
    return LlamaConfig(vocab_size=int(embeddings.shape[1]), hidden_size=key("embedding_length"),
                       intermediate_size=key("feed_forward_length"), num_hidden_layers=key("block_count"),
                       num_attention_heads=heads, num_key_value_heads=key("attention.head_count_kv", heads),
                       head_dim=key("rope.dimension_count"), max_position_embeddings=key("context_length"),
                       rms_norm_eps=key("attention.layer_norm_rms_epsilon"), rope_theta=key("rope.freq_base", 1e4),
                       tie_word_embeddings=not any(t.name == "output.weight" for t in reader.tensors), **rope)


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether `path` names a GGUF model (a file named *.gguf), which quantkit reads with this module."""
    return Path(path).suffix == ".gguf" and Path(path).is_file()


def gguf_config(path: str | os.PathLike) -> LlamaConfig:
    """The LlamaConfig of a Llama GGUF (its llama.* keys); QuantkitError (one line) otherwise."""
    return _open_llama(Path(path))[0]


def _open_llama(path: Path):
    """(config, GGUFReader) of a Llama GGUF; QuantkitError (one line) otherwise."""
    gguf = import_gguf()
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as e:
        raise QuantkitError(f"{path}: not a GGUF file gguf can read ({e})") from e
    return config_of_gguf(reader, path), reader


def _llama_tensors(config: LlamaConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """llama.cpp's tensor name -> (transformers' name, shape) of every tensor of a model of this config (gguf's
    TensorNameMap; output.weight only where the embedding is not tied)."""
    gguf = import_gguf()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    with torch.device("meta"):
        tensors = {names.get_name(n, try_suffixes=(".weight", ".bias")): (n, tuple(t.shape))
                   for n, t in LlamaForCausalLM(config).state_dict().items()}
    if config.tie_word_embeddings:
        tensors.pop("output.weight", None)
    return tensors


def _stored(path: Path, reader, config: LlamaConfig) -> Iterator[tuple[str, Any]]:
    """(transformers' name, ReaderTensor) of every tensor in the file; QuantkitError for one Llama has not."""
    ours = _llama_tensors(config)
    for t in reader.tensors:
        if t.name not in ours:
            raise QuantkitError(f"{path}: tensor {t.name} is not a Llama tensor quantkit knows")
        yield ours[t.name][0], t


def _decoded(t, name: str, config: LlamaConfig) -> np.ndarray:
    """A stored tensor decoded by gguf's dequantizer (fp32, transformers' shape and q/k row order)."""
    gguf = import_gguf()
    shape = tuple(int(d) for d in reversed(t.shape))  # ggml lists the innermost dimension first
    array = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape).astype(np.float32)
    heads = _permuted_heads(name, config)
    return np.ascontiguousarray(unpermute_rows(array, heads) if heads else array)


def _permuted_heads(name: str, config: LlamaConfig) -> int:
    """The heads whose rows llama.cpp permutes in this tensor (q_proj: heads, k_proj: kv heads), or 0."""
    if name.endswith("self_attn.q_proj.weight"):
        return config.num_attention_heads
    return config.num_key_value_heads if name.endswith("self_attn.k_proj.weight") else 0


def read_gguf(path: str | os.PathLike) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """(config, {transformers' tensor name: fp32 tensor}) of a Llama GGUF: every tensor decoded by gguf's own
    dequantizer (any ggml type it decodes, llama.cpp's quantizer's included), q_proj's and k_proj's rows back in
    transformers' order. QuantkitError (one line) for a file that is not a Llama GGUF."""
    path = Path(path)
    config, reader = _open_llama(path)
    return config, {name: torch.from_numpy(_decoded(t, name, config)) for name, t in _stored(path, reader, config)}


def unpermute_rows(rows: np.ndarray, heads: int) -> np.ndarray:
    """permute_rows' inverse: llama.cpp's row order of q_proj (heads) or k_proj (kv heads) back to transformers'."""
    shape = rows.shape
    return rows.reshape(heads, shape[0] // heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def verify_gguf(path: Path) -> tuple[int, list[str]]:
    """(tensors checked, problems one line each naming the file and tensor) of a .gguf: readable by gguf, a Llama
    GGUF, every tensor the config calls for present with its shape (and no other), each of a type gguf decodes, whole
    blocks a row, and finite once decoded (quantkit verify FILE.gguf)."""
    gguf = import_gguf()
    try:
        reader = gguf.GGUFReader(path)
        config = config_of_gguf(reader, path)
    except (ValueError, OSError, KeyError, StopIteration, QuantkitError) as e:
        return 0, [f"{path}: not a Llama GGUF quantkit can read ({e}): write it again (the file may be truncated)"]
    shapes = {n: shape for n, (_, shape) in _llama_tensors(config).items()}
    stored = {t.name: t for t in reader.tensors}
    problems = [f"{path}: tensor {n} is missing" for n in shapes if n not in stored]
    problems += [f"{path}: tensor {n} is not a Llama tensor quantkit knows" for n in stored if n not in shapes]
    for name, t in stored.items():
        if name in shapes:
            problems += _tensor_problems(path, t, shapes[name])
    return len(stored), problems


def _tensor_problems(path: Path, t, shape: tuple[int, ...]) -> list[str]:
    gguf = import_gguf()
    got = tuple(int(d) for d in reversed(t.shape))
    if got != shape:
        return [f"{path}: tensor {t.name} has shape {list(got)}, the config calls for {list(shape)}"]
    block, _ = gguf.GGML_QUANT_SIZES[t.tensor_type]
    if shape[-1] % block:
        return [f"{path}: tensor {t.name}: rows of {shape[-1]} are not whole {t.tensor_type.name} blocks of {block}"]
    try:
        values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
    except NotImplementedError:
        return [f"{path}: tensor {t.name} is of type {t.tensor_type.name}, which gguf cannot decode"]
    if not np.isfinite(values).all():
        return [f"{path}: tensor {t.name} has values that are not finite once decoded (NaN or Inf scales)"]
    return []


def affine_of_blocks(raw: np.ndarray, qtype, rows: int, cols: int) -> AffineWeight | None:
    """The AffineWeight that Q4_0 or Q8_0 blocks (rows, cols / 32 * type size) hold exactly (gguf_blocks' inverse:
    the same q, scale = d in fp16, z = 8 or 128); None for any other type (Q4_1's fp16 minimum is no integer z)."""
    kind = getattr(qtype, "name", "")
    if kind not in ("Q4_0", "Q8_0"):
        return None
    blocks = np.ascontiguousarray(raw).reshape(rows, cols // BLOCK, -1)
    scale = torch.from_numpy(blocks[..., :2].copy().view(np.float16)[..., 0])  # (rows, G)
    if kind == "Q4_0":
        packed = torch.from_numpy(blocks[..., 2:].copy())
        q, bits = torch.cat([packed & 0x0F, packed >> 4], dim=-1), 4
    else:
        q, bits = (torch.from_numpy(blocks[..., 2:].copy().view(np.int8)).to(torch.int16) + 128).to(torch.uint8), 8
    zero = torch.full(scale.shape, 2 ** (bits - 1), dtype=torch.int32)
    return AffineWeight(q=q.reshape(rows, cols).to(torch.uint8), scale=scale, zero=zero, bits=bits, group_size=BLOCK,
                        symmetric=True)


def gguf_recipe(path: str | os.PathLike, reader=None):
    """The Recipe in the file's quantkit.recipe key (a GGUF quantkit wrote), or None."""
    from quantkit.backends.recipe import Recipe

    reader = reader if reader is not None else _open_llama(Path(path))[1]
    recipe_json = gguf_value(reader, RECIPE_KEY)
    return Recipe.from_dict(json.loads(recipe_json), source=str(path)) if recipe_json else None


def gguf_tensor_types(path: str | os.PathLike) -> dict[str, tuple[str, int]]:
    """transformers' name -> (ggml type name, bytes stored) of every tensor of a Llama GGUF."""
    path = Path(path)
    config, reader = _open_llama(path)
    return {name: (t.tensor_type.name, int(t.n_bytes)) for name, t in _stored(path, reader, config)}


def load_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.float16) -> LlamaForCausalLM:
    """A Llama GGUF as a native model: Q4_0 and Q8_0 decoder linears as AffineLinear modules holding the file's
    integers and scales exactly (recorded as `rtn` of that scheme, or the config of the file's quantkit.recipe),
    every other tensor decoded by gguf's dequantizer into `dtype`; q_proj's and k_proj's rows back in transformers'
    order. QuantkitError (one line) for a file that is not a Llama GGUF."""
    from quantkit.backends.rtn import RTNConfig
    from quantkit.model.checkpoint import set_tensor
    from quantkit.quant.record import QuantRecord
    from quantkit.quant.surgery import set_module

    path = Path(path)
    config, reader = _open_llama(path)
    recipe = gguf_recipe(path, reader)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    for name, t in _stored(path, reader, config):
        module_name = name.removesuffix(".weight")
        w = None
        if is_decoder_linear(module_name) and name.endswith(".weight"):
            w = affine_of_blocks(np.asarray(t.data), t.tensor_type, *(int(d) for d in reversed(t.shape)))
        if w is None:
            set_tensor(model, name, torch.from_numpy(_decoded(t, name, config)).to(dtype))
            continue
        heads = _permuted_heads(name, config)
        if heads:
            w.q, w.scale, w.zero = (torch.from_numpy(unpermute_rows(x.numpy(), heads)) for x in (w.q, w.scale, w.zero))
        module = AffineLinear(w, dtype=dtype)
        chosen = recipe.config_for(module_name) if recipe is not None else None
        module.quant_record = QuantRecord(chosen or RTNConfig(bits=w.bits, group_size=BLOCK, symmetric=True))
        set_module(model, module_name, module)
    model.quant_recipe = recipe.to_dict() if recipe is not None else None
    model.tie_weights()
    return model.eval().requires_grad_(False)


class GGUFFormat(QuantFormat):
    """`--format gguf`: one .gguf file llama.cpp runs (and ollama, LM Studio): quantkit's AffineWeights in ggml's
    Q4_0 / Q4_1 / Q8_0 blocks with their own integers (gguf_blocks), everything else in F16/BF16/F32 (float_tensor),
    llama.cpp's converter's metadata and vocabulary. Its container is the file itself (atomic_new_file; GGUFSink
    spools the tensors beside it); quantkit reads it back with quantkit.load and checks it with quantkit verify."""

    name = "gguf"

    def refuses_config(self, config: Any) -> str | None:
        scheme = affine_scheme(config)
        if scheme is None:
            return (f"{config.method} has no integer-affine scheme (bits, group_size): GGUF holds quantkit's "
                    f"4- and 8-bit group-32 weights (rtn, gptq, awq, int4)")
        return gguf_type_problem(scheme.bits, scheme.group_size, scheme.symmetric, scheme.scattered_groups)

    def refuses_module(self, module: nn.Module) -> str | None:
        reason = refuses_non_affine(module, self.name)
        if reason is not None:
            return reason
        w = module.affine_weight()
        return gguf_type_problem(w.bits, w.group_size, w.symmetric, not trivial_g_idx(w.g_idx, w.group_size))

    def refuses_model(self, config: LlamaConfig, tokenizer_dir: Path | None) -> str | None:
        return llama_problem(config, tokenizer_dir)

    def layout_warnings(self, configs: dict[str, Any], ignored: list[str]) -> list[str]:
        return []  # llama.cpp runs each tensor in its own type: any mix of Q4_0, Q4_1, Q8_0 and float

    def check_output(self, out: Path, overwrite: bool, keep=()):
        check_gguf_path(out)
        check_output_dir(out, overwrite, keep)

    def container(self, out: Path, overwrite: bool, keep=()):
        return atomic_new_file(out, overwrite, keep)

    def export_module(self, name: str, module: nn.Module) -> dict[str, torch.Tensor]:
        return block_tensors(name, affine_of(name, module, self))

    def quantization_config(self, configs: dict[str, Any], ignored: list[str]) -> dict[str, Any]:
        return {"quant_method": self.name}  # a GGUF has no config.json: the file's own keys say it all

    @classmethod
    def matches(cls, quantization_config: dict[str, Any]) -> bool:
        return quantization_config.get("quant_method") == cls.name

    def open_sink(self, directory: Path, max_shard_size: int | str, metadata: dict[str, str], config: LlamaConfig):
        self.sink = GGUFSink(directory, config)
        return self.sink

    def finish(self, directory: Path, config_json: dict[str, Any], tokenizer_dir: Path | None, errors: list[dict]):
        self.sink.finish(Path(tokenizer_dir) if tokenizer_dir is not None else None, config_json["quantkit"]["recipe"])
