"""Evaluation text: a dataset name or local source, tokenized once, cut into scored windows.

Two protocols (DESIGN.md, "Evaluation protocols"):
- "windows" (GPTQ/AWQ, comparable with the published Llama 2 tables): the documents joined into one
  text with one BOS at the start, non-overlapping windows of seq_len, the last partial one dropped;
  each window predicts its seq_len - 1 next tokens.
- "sliding" (the Hugging Face perplexity guide): windows of up to seq_len start every `stride` tokens
  and score only the tokens the previous window did not, so each token after the first is scored
  once, with up to seq_len - stride tokens of extra context. The last window may be shorter.

Hub datasets follow the GPTQ reference code (IST-DASLab/gptq datautils.py):
- wikitext2: wikitext-2-raw-v1 test split, rows joined with "\\n\\n";
- c4: its "c4-new" evaluation text: the first 1100 documents of the first validation shard joined
  with " ", and only the first 256 * seq_len tokens of it.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import torch

from quantkit.calibrate.sources import SEQ_LEN, HubDataset, SourceRole, open_corpus
import quantkit.dist as dist
from quantkit.errors import QuantkitError

EVAL_DATASETS: dict[str, HubDataset] = {
    "wikitext2": HubDataset("wikitext", "wikitext-2-raw-v1", "test", "text", "\n\n", "random"),
    "c4": HubDataset("allenai/c4", None, "validation", "text", " ", "random",
                     data_files="en/c4-validation.00000-of-00008.json.gz"),
}
C4_DOCUMENTS, C4_WINDOWS = 1100, 256  # GPTQ datautils.get_c4_new: valdata[:1100], valenc[:, :256 * seqlen]
EVAL = SourceRole("dataset", "--dataset", "--text-field", EVAL_DATASETS, ("test", "validation"))
PROTOCOLS = ("windows", "sliding")


@dataclass(frozen=True)
class Window:
    """Tokens ids[start:end] go through the model; targets ids[score_from:end] are scored."""

    start: int
    end: int
    score_from: int  # > start: the window's first token has nothing to be predicted from

    @property
    def n_scored(self) -> int:
        return self.end - self.score_from


@dataclass
class EvalData:
    name: str
    ids: torch.Tensor  # (N,) the whole text's token ids, BOS first
    windows: list[Window]
    protocol: str
    seq_len: int
    stride: int | None

    @property
    def n_tokens(self) -> int:
        """Scored tokens."""
        return sum(w.n_scored for w in self.windows)

    def targets(self, window: Window) -> torch.Tensor:
        return self.ids[window.score_from:window.end]

    def fingerprint(self) -> str:
        """Identifies the scored tokens: the ids (so the text and the tokenizer) and the windows."""
        h = hashlib.blake2b(digest_size=16)
        h.update(self.ids.to(torch.int64).numpy().tobytes())
        h.update(repr([(w.start, w.end, w.score_from) for w in self.windows]).encode())
        return h.hexdigest()

    def describe(self) -> dict:
        return {"name": self.name, "protocol": self.protocol, "seq_len": self.seq_len, "stride": self.stride,
                "n_windows": len(self.windows), "n_tokens": self.n_tokens, "fingerprint": self.fingerprint()}

    def shard(self) -> tuple["EvalData", list[int]]:
        """This rank's share of the windows under torchrun (quantkit.dist.shard: every world_size-th), and their
        indices in `windows`; in one process, all of them."""
        indices = dist.shard(len(self.windows))
        return dataclasses.replace(self, windows=[self.windows[i] for i in indices]), indices

    def batches(self, batch_size: int):
        """(ids (B, T), windows) with windows of equal length batched together, in order."""
        batch: list[Window] = []
        for w in self.windows:
            if batch and (len(batch) == batch_size or w.end - w.start != batch[0].end - batch[0].start):
                yield self._stack(batch), batch
                batch = []
            batch.append(w)
        if batch:
            yield self._stack(batch), batch

    def _stack(self, windows: list[Window]) -> torch.Tensor:
        return torch.stack([self.ids[w.start:w.end] for w in windows])


def non_overlapping(n_ids: int, seq_len: int) -> list[Window]:
    return [Window(s, s + seq_len, s + 1) for s in range(0, n_ids - seq_len + 1, seq_len)]


def sliding(n_ids: int, seq_len: int, stride: int) -> list[Window]:
    """The Hugging Face guide's loop: begin every stride tokens, score from the previous window's end."""
    windows, prev_end = [], 0
    for begin in range(0, n_ids, stride):
        end = min(begin + seq_len, n_ids)
        if max(prev_end, begin + 1) < end:  # a last window of one token would score nothing
            windows.append(Window(begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_ids:
            break
    return windows


def eval_text(source, text_field: str = "text") -> tuple[str, str]:
    """(name, text) of a dataset name (wikitext2, c4), a local file, a save_to_disk directory or a list of strings."""
    corpus = open_corpus(source, text_field, EVAL)
    docs = corpus.docs[:C4_DOCUMENTS] if source == "c4" else corpus.docs
    return corpus.name, corpus.joiner.join(docs)


def eval_data(tokenizer, source, seq_len: int = SEQ_LEN, stride: int | None = None, text_field: str = "text",
              max_tokens: int | None = None, vocab_size: int | None = None) -> EvalData:
    """Tokenize `source` (a dataset name, a path, a list of strings) once, with one BOS, and cut it into windows.

    vocab_size: the model's (config.json); a tokenizer giving an id at or beyond it is refused here, not in
    the embedding."""
    check_protocol(seq_len, stride)
    name, text = eval_text(source, text_field)
    ids = torch.tensor(tokenizer.encode(text, bos=True), dtype=torch.long)
    if source == "c4":
        ids = ids[: C4_WINDOWS * seq_len]
    return windows_of(name, checked(tokenizer, ids[:max_tokens], vocab_size), seq_len, stride)


def checked(tokenizer, ids: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    """`ids` once the tokenizer has checked them against the model's vocab_size (when it is given)."""
    if vocab_size is not None:
        tokenizer.check_ids(ids, vocab_size)
    return ids


def check_protocol(seq_len: int, stride: int | None) -> None:
    if seq_len < 2:
        raise QuantkitError(f"--seq-len {seq_len}: a window needs at least 2 tokens")
    if stride is not None and not 0 < stride <= seq_len:
        raise QuantkitError(f"--stride {stride}: must be between 1 and --seq-len ({seq_len})")


def windows_of(name: str, ids: torch.Tensor, seq_len: int, stride: int | None = None) -> EvalData:
    """EvalData over token ids (N,): non-overlapping windows, or sliding ones with `stride`."""
    check_protocol(seq_len, stride)
    if len(ids) < seq_len:
        raise QuantkitError(f"dataset {name} has {len(ids)} tokens, fewer than one window of --seq-len {seq_len}: "
                            f"use more text or a smaller --seq-len")
    if stride is None:
        return EvalData(name, ids, non_overlapping(len(ids), seq_len), "windows", seq_len, None)
    return EvalData(name, ids, sliding(len(ids), seq_len, stride), "sliding", seq_len, stride)


def text_data(tokenizer, text: str, seq_len: int, stride: int | None = None, name: str = "text",
              vocab_size: int | None = None) -> EvalData:
    """EvalData of a text given as a string; vocab_size as in eval_data."""
    ids = torch.tensor(tokenizer.encode(text, bos=True), dtype=torch.long)
    return windows_of(name, checked(tokenizer, ids, vocab_size), seq_len, stride)


def token_windows(tokenizer, text: str, seq_len: int, vocab_size: int | None = None) -> torch.Tensor:
    """(n_windows, seq_len) ids of the GPTQ protocol: BOS + the text's tokens, cut without overlap."""
    data = text_data(tokenizer, text, seq_len, vocab_size=vocab_size)
    return data.ids[: len(data.windows) * seq_len].view(-1, seq_len)
