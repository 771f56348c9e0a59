"""Base-model log-probs saved once and streamed back, so a comparison never holds two models at once.

A `.qkl` file is a safetensors file (readable by any safetensors reader) with, per evaluation window
(its tensors named after the window's first token, `i` below), the base's distribution over the
vocabulary at each scored token, in one of two encodings:

- "uint16" (the default, llama.cpp's `--kl-divergence-base` scheme): every log-prob, per token
  linearly quantized to 16 bits between the token's smallest and largest log-prob:
    i.logprobs (n, vocab) int16 (u16 - 32768), i.logprob_min (n,) float32, i.logprob_scale (n,) float32
  Rounding moves a log-prob by at most scale / 2 (about 3e-4 nats for a 40-nat range): KL moves by
  about 1e-6 relative (measured: bench/RESULTS.md, "Saved base logits"). 2 bytes per vocabulary entry:
  a 7B WikiText-2 run (~340k tokens) is ~22 GB, as with llama.cpp.
- "topk" (`top_k=K`): the K largest log-probs and the rest's mass in one bucket (eval.fidelity.TopK):
    i.topk_logprobs (n, K) float32, i.topk_ids (n, K) int32, i.rest_logmass (n,) float32
  ~K*8 bytes a token (K = 32: 90 MB for 7B WikiText-2), but KL becomes a lower bound that misses the
  tail's share: 26-35% of the KL of an int4 model on the demo model at K = 16-64 (measured, same place).
  Top-1, top-5 (K >= 5), delta-p and perplexities stay exact.

Both store i.target_logprob (n,) float32, exact, and i.targets (n,) int32. The metadata names the
model, its vocabulary and tokenizer fingerprint, and the dataset with its fingerprint (the tokens and
the windows), so a file made from another dataset or tokenizer is refused with a message.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

import quantkit.dist as dist
from quantkit.eval.data import EvalData, Window
from quantkit.eval.fidelity import TopK, compress
from quantkit.eval.runner import window_logprobs
from quantkit.errors import QuantkitError
from quantkit.io.files import DiskFull, atomic_file, check_writable, is_disk_full
from quantkit.io.shards import ShardWriter

FORMAT = "quantkit-base-logits"
VERSION = "1"
U16_LEVELS = 65535


def encode(logprobs: torch.Tensor, targets: torch.Tensor, top_k: int | None = None) -> dict[str, torch.Tensor]:
    """A window's log-probs (n, vocab) as the tensors of its encoding (names without the window prefix)."""
    exact = {"target_logprob": logprobs.gather(-1, targets[:, None]).squeeze(-1), "targets": targets.int()}
    if top_k:
        top = compress(logprobs, targets, min(top_k, logprobs.shape[-1]))
        return {"topk_logprobs": top.logprobs, "topk_ids": top.ids.int(), "rest_logmass": top.rest_logmass, **exact}
    low = logprobs.min(-1).values.clamp(min=-1e4)  # (n,); a -inf log-prob (a masked logit) saturates here
    scale = ((logprobs.max(-1).values - low) / U16_LEVELS).clamp(min=1e-12)
    levels = ((logprobs - low[:, None]) / scale[:, None]).round().clamp(0, U16_LEVELS)
    return {"logprobs": (levels - 32768).to(torch.int16), "logprob_min": low, "logprob_scale": scale, **exact}


def decode(tensors: dict[str, torch.Tensor]) -> torch.Tensor | TopK:
    """Full log-probs (n, vocab), renormalised, with the exact target log-probs put back; or a TopK."""
    if "topk_ids" in tensors:
        return TopK(tensors["topk_logprobs"], tensors["topk_ids"].long(), tensors["rest_logmass"],
                    tensors["target_logprob"])
    levels = tensors["logprobs"].float() + 32768
    logprobs = torch.log_softmax(tensors["logprob_min"][:, None] + levels * tensors["logprob_scale"][:, None], -1)
    return logprobs.scatter(-1, tensors["targets"].long()[:, None], tensors["target_logprob"][:, None])


def save_base_logits(model, tokenizer, data: EvalData, path: str | os.PathLike, top_k: int | None = None,
                     batch_size: int = 1, progress: bool = True, model_info: dict | None = None) -> Path:
    """Run the base model over `data` and write its log-probs to `path`; streamed, written atomically."""
    path = Path(path)
    if top_k is not None and top_k < 5:
        raise QuantkitError(f"--top-k {top_k}: top-5 overlap needs at least 5 saved tokens; use --top-k 5 or more")
    check_writable(path)  # before the model runs: a read-only or missing directory, no permission, a long name
    metadata = {"format": FORMAT, "version": VERSION, "encoding": "topk" if top_k else "uint16",
                "top_k": str(top_k or 0), "vocab_size": str(model.config.vocab_size),
                "tokenizer": tokenizer.fingerprint(), "dataset": json.dumps(data.describe()),
                "model": json.dumps(model_info or {})}
    needed = 2 * saved_bytes(data, model.config.vocab_size, top_k)
    # closing: on an error the progress bar ends (its line) before the error's line is printed
    with contextlib.closing(window_logprobs(model, data, batch_size, progress, "base logits", shard=True)) as logprobs:
        windows = ((f"{w.start}.{key}", value) for w, lp in logprobs
                   for key, value in encode(lp, data.targets(w), top_k).items())
        if dist.world_size() == 1:
            return _write_one_file(path, windows, metadata, needed)
        return _write_parts_then_join(path, windows, metadata, needed)


def _write_parts_then_join(path: Path, windows, metadata: dict[str, str], needed: int) -> Path:
    """Under torchrun: each rank writes its windows to its own part beside `path`, then rank 0 joins the parts."""
    parts = path.parent / dist.broadcast_from_main(f".{path.name}.quantkit-parts-{os.getpid()}")
    try:
        dist.collective(lambda: _write_one_file(parts / f"part-{dist.rank()}.qkl", windows, metadata, needed, True))
        if dist.is_main():
            _write_one_file(path, _part_tensors(sorted(parts.glob("part-*.qkl"))), metadata, needed)
        dist.collective(lambda: None)  # the file is complete before any rank goes on
    finally:
        if dist.is_main():
            shutil.rmtree(parts, ignore_errors=True)
    return path


def _write_one_file(path: Path, tensors, metadata: dict[str, str], needed: int, make_parent: bool = False) -> Path:
    """(name, tensor) pairs into one safetensors file at `path`, atomically: ShardWriter streams (a spool file, then
    header + spool into one shard file) in a scratch directory beside `path`; the finished shard becomes
    atomic_file's temporary, which replaces `path` on success. On an exception or SIGTERM both the scratch directory
    and the temporary are removed. A full disk is a DiskFull naming `needed` bytes."""
    if make_parent:
        path.parent.mkdir(exist_ok=True)
    with atomic_file(path) as tmp, tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as scratch:
        writer = ShardWriter(scratch, max_shard_size=2**62, metadata=metadata)  # one file, spooled to disk
        try:
            for name, value in tensors:
                writer.add(name, value.contiguous())
            (name,) = writer.close()
        except OSError as e:
            if not is_disk_full(e):
                raise
            raise DiskFull(path, writer.total_size, needed,
                           fix="free space, save it elsewhere, or use --top-k (about 8 bytes per kept token)") from None
        os.replace(Path(scratch) / name, tmp)
    return path


def _part_tensors(parts: list[Path]):
    """Every tensor of the ranks' part files, part after part."""
    for part in parts:
        with safe_open(part, "pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def saved_bytes(data: EvalData, vocab_size: int, top_k: int | None) -> int:
    """Bytes of a .qkl file's tensors (twice this while it is written: the spool, then the file)."""
    per_token = (top_k * 8 + 4 if top_k else vocab_size * 2 + 8) + 8  # + target_logprob, targets
    return sum(w.n_scored for w in data.windows) * per_token


class BaseLogits:
    """A saved .qkl file, opened lazily; `window(w)` reads one window's log-probs (or TopK)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise QuantkitError(f"{self.path}: no such base-logits file: make it with "
                                f"`quantkit eval BASE --save-logits {self.path}` on the same --dataset and --seq-len")
        try:
            with safe_open(str(self.path), framework="pt") as f:
                self.metadata = f.metadata() or {}
        except (SafetensorError, OSError) as e:
            raise QuantkitError(f"{self.path}: not a base-logits file ({e}): make it with "
                                f"`quantkit eval BASE --save-logits FILE`") from None
        if self.metadata.get("format") != FORMAT:
            raise QuantkitError(f"{self.path}: a safetensors file, but not quantkit base logits: make it with "
                                f"`quantkit eval BASE --save-logits FILE`")
        if self.metadata.get("version") != VERSION:
            raise QuantkitError(f"{self.path}: base-logits version {self.metadata.get('version')}, this quantkit "
                                f"reads version {VERSION}: save the base logits again")
        self.top_k = int(self.metadata["top_k"]) or None
        self.vocab_size = int(self.metadata["vocab_size"])
        self.dataset = json.loads(self.metadata["dataset"])
        self.model_info = json.loads(self.metadata["model"])

    def check_matches(self, data: EvalData, vocab_size: int, tokenizer) -> None:
        """The file must come from this dataset run, this vocabulary and this tokenizer."""
        if vocab_size != self.vocab_size:
            raise QuantkitError(f"{self.path}: saved from a model with a vocabulary of {self.vocab_size}, the evaluated "
                                f"model has {vocab_size}: compare models that share a tokenizer")
        if tokenizer.fingerprint() != self.metadata["tokenizer"]:
            raise QuantkitError(f"{self.path}: saved with another tokenizer than the evaluated model's: "
                                f"compare models that share a tokenizer.model")
        if data.fingerprint() != self.dataset["fingerprint"]:
            saved, now = _describe(self.dataset), _describe(data.describe())
            raise QuantkitError(f"{self.path}: made from {saved}, not from this run's {now}: use the same --dataset, "
                                f"--seq-len and --stride, or save the base logits again")

    def window(self, window: Window) -> torch.Tensor | TopK:
        """The window's saved log-probs (check_matches first: it checks the file holds this dataset's windows)."""
        prefix = f"{window.start}."
        with safe_open(str(self.path), framework="pt") as f:
            tensors = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
        if not tensors:
            raise QuantkitError(f"{self.path}: no saved log-probs for the window at token {window.start}: "
                                f"the file was made from another dataset run (see check_matches)")
        return decode(tensors)


    def target_nll(self, data: EvalData) -> torch.Tensor:
        """(n_tokens,) the base's NLL of every scored token, in window order (exact: stored in fp32)."""
        with safe_open(str(self.path), framework="pt") as f:
            return torch.cat([-f.get_tensor(f"{w.start}.target_logprob").double() for w in data.windows])


class MemoryBaseLogits:
    """The same encoding kept in memory, for comparing several models against one base run."""

    def __init__(self, model, data: EvalData, top_k: int | None = None, batch_size: int = 1, progress: bool = True):
        self.top_k = top_k
        self.windows = {w: encode(lp, data.targets(w), top_k)
                        for w, lp in window_logprobs(model, data, batch_size, progress, desc="base logits")}

    def window(self, window: Window) -> torch.Tensor | TopK:
        return decode(self.windows[window])


def _describe(dataset: dict) -> str:
    stride = f", stride {dataset['stride']}" if dataset.get("stride") else ""
    return (f"dataset {dataset['name']} ({dataset['protocol']}, seq_len {dataset['seq_len']}{stride}, "
            f"{dataset['n_tokens']} scored tokens)")
