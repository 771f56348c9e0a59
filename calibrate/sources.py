"""Calibration sources: a dataset name, a local file or directory, a list of strings, or ready token ids.

Text sources become a `Corpus` (its documents, the separator that joins them, the sampling protocol
that goes with it, and a content fingerprint for the token cache). Token sources (a LongTensor
[n, seq_len], or a .pt/.safetensors file holding one) skip tokenization entirely.

The hub datasets are loaded exactly as the GPTQ reference code loads its calibration sets
(IST-DASLab/gptq, datautils.py: get_wikitext2, get_ptb, get_ptb_new, get_c4); local files in the
formats `datasets.load_dataset` reads (json lines, parquet, csv) go through that same code path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Iterable, Sequence

import torch

from quantkit.errors import QuantkitError

log = logging.getLogger("quantkit.calibrate")

MODES = ("random", "document")
SEQ_LEN = 2048  # tokens per window, calibration and evaluation alike: the GPTQ protocol (Llama 2's papers report
#                 WikiText-2 perplexity at 2048; GPTQ calibrates on 128 windows of 2048). The one default.


@dataclass(frozen=True)
class HubDataset:
    """How the GPTQ reference code loads one calibration set from the Hugging Face hub."""

    path: str
    config: str | None
    split: str
    field: str  # the column holding the text
    joiner: str  # documents are joined with this and tokenized once (mode "random")
    mode: str  # the reference protocol: "random" windows of the joined text, or one window per "document"
    data_files: str | None = None


# IST-DASLab/gptq datautils.py, train splits (what GPTQ calibrates on):
#   get_wikitext2: load_dataset('wikitext', 'wikitext-2-raw-v1', split='train'), "\n\n".join(text)
#   get_ptb:       load_dataset('ptb_text_only', 'penn_treebank', split='train'), "\n\n".join(sentence)
#   get_ptb_new:   the same rows, " ".join(sentence)
#   get_c4:        load_dataset('allenai/c4', 'allenai--c4', data_files={'train': 'en/c4-train.00000-of-01024.json.gz'},
#                  split='train'); a random document with >= seqlen tokens per sample, a random window in it.
# The 'allenai--c4' config name is dropped: datasets >= 2.16 raises "BuilderConfig 'allenai--c4' not found"
# (huggingface/datasets#6559; IST-DASLab/sparsegpt#30 made the same fix) and data_files alone selects the
# same shard. C4's joiner only serves mode="random", which GPTQ never used on C4 (its c4-new evaluation
# text joins documents with " "). ptb_text_only is a script dataset: datasets >= 4 refuses to run scripts.
KNOWN_DATASETS: dict[str, HubDataset] = {
    "wikitext2": HubDataset("wikitext", "wikitext-2-raw-v1", "train", "text", "\n\n", "random"),
    "ptb": HubDataset("ptb_text_only", "penn_treebank", "train", "sentence", "\n\n", "random"),
    "ptb-new": HubDataset("ptb_text_only", "penn_treebank", "train", "sentence", " ", "random"),
    "c4": HubDataset("allenai/c4", None, "train", "text", " ", "document",
                     data_files="en/c4-train.00000-of-01024.json.gz"),
}

# suffix -> the `datasets.load_dataset` builder that reads it (.txt is read directly: one document)
@dataclass(frozen=True)
class SourceRole:
    """Who reads a text source: messages name it, hub names resolve in `known`, DatasetDicts use `splits`.

    calibrate/ reads train splits for GPTQ; eval/ reads the same kinds of sources for its test text.
    """

    what: str  # "calibration source", "dataset"
    flag: str  # the command-line flag that takes the source
    field_flag: str  # the flag that names the text field of .jsonl/.parquet/.csv sources (text_field= in Python)
    known: dict[str, HubDataset]
    splits: tuple[str, ...]  # preferred split of a save_to_disk DatasetDict, in order


CALIBRATION = SourceRole("calibration source", "--calib", "--calib-field", KNOWN_DATASETS, ("train",))

DATASET_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
TOKEN_SUFFIXES = (".pt", ".safetensors")
SUPPORTED = ".txt, .jsonl, .json, .parquet, .csv, a datasets save_to_disk directory, .pt or .safetensors token ids"


class ArrowTexts(Sequence[str]):
    """A string column of a `datasets.Dataset`, read lazily: C4's shard is ~800 MB of text and
    document sampling touches only a few thousand rows. A null cell reads as an empty document."""

    def __init__(self, column):  # pyarrow.ChunkedArray of strings
        self.column = column

    def __len__(self) -> int:
        return len(self.column)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self.column[index].as_py() or ""

    def __iter__(self):
        for chunk in self.column.chunks:
            for text in chunk.to_pylist():
                yield text or ""

    def to_list(self) -> list[str]:
        return list(self)


@dataclass
class Corpus:
    """Documents of a text source and how to sample them."""

    name: str  # for messages and cache metadata: 'wikitext2', a path, 'a list of 3 strings'
    docs: Sequence[str]
    joiner: str = "\n\n"  # the perplexity protocol's separator (DESIGN.md) unless the recipe says otherwise
    mode: str = "random"  # the default protocol for this source
    details: dict = field(default_factory=dict)

    def text(self) -> str:
        """The documents joined into the one text that mode 'random' tokenizes."""
        return self.joiner.join(self.docs)

    @cached_property
    def fingerprint(self) -> str:
        """Content hash of the documents (framed, so that document boundaries count)."""
        return hash_documents(self.docs)

    def check_not_empty(self, role: "SourceRole") -> None:
        if len(self.docs) == 0:
            raise QuantkitError(f"{role.what} {self.name} is empty (no rows): give it some text")
        if not any(doc.strip() for doc in self.docs):
            raise QuantkitError(f"{role.what} {self.name} has {len(self.docs)} rows but no text "
                                f"(all empty or whitespace): give it some text")


def hash_documents(docs: Iterable[str]) -> str:
    h = hashlib.blake2b(digest_size=20)
    for doc in docs:
        data = doc.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def load_text(source, text_field: str = "text", role: SourceRole = CALIBRATION) -> list[str]:
    """The documents of a text source (a dataset name, a file, a save_to_disk directory, a list of strings).

    Hub datasets use their recipe's field (KNOWN_DATASETS); `text_field` names the column of local files.
    """
    return list(open_corpus(source, text_field, role).docs)


def is_token_source(source) -> bool:
    """A LongTensor of token ids or a .pt/.safetensors file: sampled as is, never tokenized."""
    if isinstance(source, torch.Tensor):
        return True
    if isinstance(source, (str, os.PathLike)) and not (isinstance(source, str) and source in KNOWN_DATASETS):
        path = Path(source)
        return path.suffix.lower() in TOKEN_SUFFIXES and path.is_file()
    return False


def open_corpus(source, text_field: str = "text", role: SourceRole = CALIBRATION) -> Corpus:
    if isinstance(source, torch.Tensor):
        raise QuantkitError("a token tensor is not text: pass it to calibration_tokens, which samples it as is")
    if isinstance(source, (list, tuple)):
        corpus = _corpus_from_list(source)
    elif isinstance(source, str) and source in role.known:
        corpus = _corpus_from_hub(source, role)
    elif isinstance(source, (str, os.PathLike)):
        corpus = _corpus_from_path(Path(source), text_field, role)
    else:
        raise QuantkitError(f"{role.what} of type {type(source).__name__} is not supported: pass a dataset "
                            f"name ({', '.join(role.known)}), a path, a list of strings or a token tensor")
    corpus.check_not_empty(role)
    return corpus


def _corpus_from_list(source) -> Corpus:
    bad = [i for i, doc in enumerate(source) if not isinstance(doc, str)]
    if bad:
        raise QuantkitError(f"calibration list: item {bad[0]} is a {type(source[bad[0]]).__name__}, not a string: "
                            f"pass a list of strings")
    return Corpus(f"a list of {len(source)} strings", list(source))


def check_source(source, role: SourceRole = CALIBRATION) -> None:
    """Refuse (one QuantkitError) a source that cannot be read, without reading it: a path that does not exist,
    cannot be read or has an unsupported suffix. Hub names, lists and tensors pass (they are checked when read).
    What quantkit plan and quantize decide before any work."""
    if not isinstance(source, (str, os.PathLike)) or (isinstance(source, str) and source in role.known):
        return
    path = Path(source)
    if not path.exists():
        raise QuantkitError(f"{role.what} {str(path)!r} is neither a known dataset ({', '.join(role.known)}) "
                            f"nor an existing file or directory: pass one of those names or a path ({SUPPORTED})")
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        raise QuantkitError(f"{role.what} {path} cannot be read (permission denied): fix its permissions "
                            f"({role.flag})")
    suffix = path.suffix.lower()
    if path.is_file() and suffix not in (*TOKEN_SUFFIXES, ".txt", *DATASET_BUILDERS):
        raise QuantkitError(f"{path}: unsupported {role.what} file type {suffix or '(none)'!r}: use {SUPPORTED}")


def _corpus_from_path(path: Path, text_field: str, role: SourceRole) -> Corpus:
    check_source(path, role)
    if path.is_dir():
        return _corpus_from_disk(path, text_field, role)
    suffix = path.suffix.lower()
    if suffix in TOKEN_SUFFIXES:
        raise QuantkitError(f"{path} holds token ids, not text: pass it to calibration_tokens")
    if suffix == ".txt":
        return _corpus_from_txt(path, role)
    return _corpus_from_file(path, DATASET_BUILDERS[suffix], text_field, role)


def _corpus_from_txt(path: Path, role: SourceRole) -> Corpus:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise QuantkitError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}): convert it to UTF-8") from None
    if not text.strip():
        raise QuantkitError(f"{role.what} {path} is empty (no text): give it some text")
    return Corpus(str(path), [text])


def _corpus_from_file(path: Path, builder: str, text_field: str, role: SourceRole) -> Corpus:
    _check_has_rows(path, builder, role)
    datasets = _import_datasets()
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except datasets.exceptions.DatasetGenerationError as e:
        cause = e.__cause__ or e
        raise QuantkitError(f"{path}: not readable as {builder} ({type(cause).__name__}: {cause}): "
                            f"fix the file or convert it to .jsonl with one {{\"{text_field}\": ...}} per line") from e
    return _corpus_from_dataset(ds, text_field, str(path), field_flag=role.field_flag)


def _check_has_rows(path: Path, builder: str, role: SourceRole) -> None:
    """datasets cannot build a zero-row split (it raises StopIteration or 'corresponds to no data'): say so first."""
    if builder == "parquet":
        import pyarrow.parquet as pq

        empty = pq.read_metadata(path).num_rows == 0
    else:
        needed = 2 if builder == "csv" else 1  # csv: a header line and at least one row
        empty = _count_nonblank_lines(path, stop_at=needed) < needed
    if empty:
        raise QuantkitError(f"{role.what} {path} is empty (no rows): give it some text")


def _count_nonblank_lines(path: Path, stop_at: int) -> int:
    count = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            count += bool(line.strip())
            if count >= stop_at:
                break
    return count


def _corpus_from_disk(path: Path, text_field: str, role: SourceRole) -> Corpus:
    _check_disk_has_rows(path, role)
    datasets = _import_datasets()
    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise QuantkitError(f"{path}: a directory, but not one written by datasets' save_to_disk ({e}): "
                            f"pass a file ({SUPPORTED})") from None
    if isinstance(ds, datasets.DatasetDict):
        split = next((s for s in role.splits if s in ds), None)
        if split is None and len(ds) != 1:
            raise QuantkitError(f"{path}: a DatasetDict with splits {', '.join(ds)} and none of "
                                f"{', '.join(role.splits)}: save the split to use with Dataset.save_to_disk")
        ds = ds[split] if split else next(iter(ds.values()))
    return _corpus_from_dataset(ds, text_field, str(path), field_flag=role.field_flag)


def _check_disk_has_rows(path: Path, role: SourceRole) -> None:
    """save_to_disk writes a zero-row Dataset with no arrow shard, which load_from_disk (datasets 5.2) fails
    to read with an IndexError: recognise it from state.json's empty shard list."""
    state = path / "state.json"
    if not state.is_file():
        return
    try:
        shards = json.loads(state.read_text(encoding="utf-8")).get("_data_files")
    except json.JSONDecodeError as e:
        raise QuantkitError(f"{state}: not valid JSON ({e}): save the dataset again with save_to_disk") from None
    if shards == []:
        raise QuantkitError(f"{role.what} {path} is empty (no rows): give it some text")


def _corpus_from_hub(key: str, role: SourceRole) -> Corpus:
    spec = role.known[key]
    datasets = _import_datasets()
    kwargs = {"split": spec.split}
    if spec.data_files:
        kwargs["data_files"] = {spec.split: spec.data_files}
    try:
        ds = datasets.load_dataset(spec.path, spec.config, **kwargs)
    except _hub_errors() as e:
        raise QuantkitError(f"{role.what} {key} needs the Hugging Face hub, which is unreachable "
                            f"({type(e).__name__}: {e}): pass a local file instead, e.g. {role.flag} path/to/text.txt") from e
    except RuntimeError as e:
        if "scripts are no longer supported" not in str(e):
            raise
        # ptb_text_only is a script dataset, which datasets >= 4 refuses to run.
        raise QuantkitError(f"{role.what} {key} ({spec.path}) is a script dataset that datasets "
                            f"{datasets.__version__} no longer runs: save its text to a local file and pass "
                            f"that instead, e.g. {role.flag} ptb.txt") from e
    details = {"hub": spec.path, "config": spec.config, "split": spec.split, "data_files": spec.data_files}
    return _corpus_from_dataset(ds, spec.field, key, spec.joiner, spec.mode, details)


def _hub_errors() -> tuple[type[BaseException], ...]:
    """What an unreachable hub raises: datasets wraps it in ConnectionError (OfflineModeIsEnabled is one);
    a failure while fetching data files can surface as httpx's transport error (huggingface_hub >= 1)."""
    errors: tuple[type[BaseException], ...] = (ConnectionError,)
    try:
        import httpx
    except ImportError:
        return errors
    return errors + (httpx.TransportError,)


def _corpus_from_dataset(ds, text_field: str, name: str, joiner: str = "\n\n", mode: str = "random",
                         details: dict | None = None, field_flag: str = "--calib-field") -> Corpus:
    from datasets import Value

    how = f"{field_flag} (text_field= in Python)"
    if text_field not in ds.column_names:
        raise QuantkitError(f"{name}: no text field {text_field!r}; its fields are {', '.join(ds.column_names)}: "
                            f"pass {how} <one of them>")
    feature = ds.features[text_field]
    if not (isinstance(feature, Value) and feature.dtype in ("string", "large_string")):
        raise QuantkitError(f"{name}: field {text_field!r} holds {feature}, not text: name the text field with {how}")
    column = ds.with_format("arrow")[text_field]  # pyarrow.ChunkedArray, memory-mapped
    if column.null_count:
        log.warning("%s: %d of %d rows of %r are null; they count as empty documents",
                    name, column.null_count, len(column), text_field)
    return Corpus(name, ArrowTexts(column), joiner, mode, dict(details or {}, field=text_field))


def _import_datasets():
    import datasets  # lazily: importing it costs about a second

    return datasets


# ---- token sources ------------------------------------------------------------------------------


def load_tokens(source) -> tuple[torch.Tensor, str]:
    """(tensor, name) of a token source: a tensor, or the one tensor in a .pt/.safetensors file."""
    if isinstance(source, torch.Tensor):
        return source, "the token tensor"
    path = Path(source)
    if path.suffix.lower() == ".safetensors":
        return _tensor_from_safetensors(path), str(path)
    return _tensor_from_pt(path), str(path)


def _tensor_from_safetensors(path: Path) -> torch.Tensor:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            if len(keys) != 1:
                _several_tensors(path, {k: tuple(f.get_slice(k).get_shape()) for k in keys})
            return f.get_tensor(keys[0])
    except SafetensorError as e:
        raise QuantkitError(f"{path}: not a readable safetensors file ({e}): "
                            f"write it with safetensors.torch.save_file") from None


def _tensor_from_pt(path: Path) -> torch.Tensor:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise QuantkitError(f"{path}: not a torch file of plain tensors ({type(e).__name__}: {str(e).splitlines()[0]}): "
                            f"save the token ids with torch.save(tensor, path)") from None
    if isinstance(obj, torch.Tensor):
        return obj
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else None
    if items is None:
        raise QuantkitError(f"{path}: holds a {type(obj).__name__}, not a tensor: "
                            f"save the token ids with torch.save(tensor, path)")
    tensors = {str(k): v for k, v in items}
    if len(tensors) != 1 or not isinstance(next(iter(tensors.values())), torch.Tensor):
        _several_tensors(path, {k: tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                                for k, v in tensors.items()})
    return next(iter(tensors.values()))


def _several_tensors(path: Path, contents: dict) -> None:
    listing = ", ".join(f"{k} {v}" for k, v in contents.items()) or "nothing"
    raise QuantkitError(f"{path}: holds {len(contents)} entries ({listing}), not exactly one [n_samples, seq_len] "
                        f"tensor of token ids: save only the token ids")


def check_token_tensor(tokens: torch.Tensor, vocab_size: int, name: str) -> None:
    """Token ids must be a 2-D integer tensor [n_samples, seq_len] with ids in [0, vocab_size)."""
    if tokens.dim() != 2:
        raise QuantkitError(f"{name}: token ids must be 2-D [n_samples, seq_len], got shape {tuple(tokens.shape)}: "
                            f"reshape it (a flat stream: ids[: n * seq_len].view(n, seq_len))")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise QuantkitError(f"{name}: token ids must be integers, got {tokens.dtype}: convert with .long()")
    if tokens.numel() == 0:
        raise QuantkitError(f"calibration source {name} is empty (shape {tuple(tokens.shape)}): give it token ids")
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise QuantkitError(f"{name}: token id {bad} is outside the tokenizer's vocabulary [0, {vocab_size}): "
                            f"these ids come from another tokenizer; re-tokenize the text with this model's")
