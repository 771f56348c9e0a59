"""Sampling a calibration source into token windows: a LongTensor [n_samples, seq_len].

Mode "random" (GPTQ's protocol for WikiText-2 and PTB): the documents joined into one text,
tokenized once with one BOS at the start (as the reference code's HF tokenizer call does), then
n_samples windows of seq_len tokens at random start offsets. The offsets are distinct (GPTQ draws
with replacement; a repeated window would only weigh twice in the Hessian), so a text with room
for fewer distinct windows than n_samples is an error.

Mode "document" (GPTQ's protocol for C4): documents are visited in a random order, each
tokenized on its own with BOS; one with at least seq_len tokens gives one window at a random
offset inside it, until n_samples windows are drawn. Documents are used at most once. Too few
long documents is an error, not a shorter tensor with a warning: GPTQ's Hessian estimate, its
comparability with published numbers and the caller's memory planning all assume n_samples, and
the fix (a smaller seq_len or n_samples, mode "random", a bigger source) is the caller's choice.

Both modes draw from `torch.Generator().manual_seed(seed)` only, so a seed gives the same tensor
whether the token ids come from the tokenizer or from the cache.
"""

from __future__ import annotations

import logging
import time

import torch
from tqdm.auto import tqdm

from quantkit.calibrate.cache import TokenCache, file_digest, resolve_cache_dir
from quantkit.calibrate.sources import MODES, SEQ_LEN, Corpus, check_token_tensor, is_token_source, load_tokens, open_corpus
from quantkit.errors import QuantkitError

log = logging.getLogger("quantkit.calibrate")


def calibration_tokens(source, tokenizer, n_samples: int = 128, seq_len: int = SEQ_LEN, seed: int = 0,
                       mode: str | None = None, text_field: str = "text", cache_dir=None,
                       vocab_size: int | None = None) -> torch.Tensor:
    """[n_samples, seq_len] LongTensor of token ids from a calibration source.

    source: a name in KNOWN_DATASETS, a .txt/.jsonl/.json/.parquet/.csv file, a save_to_disk directory,
    a list of strings, or ready token ids (a LongTensor [n, seq_len], or a .pt/.safetensors file holding
    one; the first n_samples rows are used). mode: "random" or "document"; None takes the source's
    reference protocol ("document" for c4, "random" for everything else). text_field: the text column
    of local dataset files. cache_dir: where token ids are cached (see calibrate.cache). vocab_size: the
    model's (config.json): an id at or beyond it is refused, whether the tokenizer gave it (a text source)
    or the caller (ready ids); without it, ready ids are checked against len(tokenizer) (pieces and added
    tokens).
    """
    check_sizes(n_samples, seq_len, mode)
    if is_token_source(source):
        tokens, name = load_tokens(source)
        return ready_windows(tokens, name, len(tokenizer) if vocab_size is None else vocab_size, n_samples, seq_len)
    corpus = open_corpus(source, text_field)
    mode = corpus.mode if mode is None else mode
    generator = torch.Generator().manual_seed(seed)
    cache = _token_cache(corpus, tokenizer, mode, cache_dir)
    if mode == "random":
        windows = random_windows(text_ids(corpus, tokenizer, cache), n_samples, seq_len, generator, corpus.name)
    else:
        windows = document_windows(corpus, tokenizer, cache, n_samples, seq_len, generator)
    if vocab_size is not None:  # once, on the windows the model will see (cached ids too: the cache has no model)
        tokenizer.check_ids(windows, vocab_size)
    return windows


RANDOM_MODE = "--calib-mode random (mode='random' in Python)"


def check_sizes(n_samples: int, seq_len: int, mode: str | None) -> None:
    """One line for a calibration set that cannot exist (no windows, empty windows, an unknown mode)."""
    if mode is not None and mode not in MODES:
        raise QuantkitError(f"--calib-mode {mode!r} (mode= in Python) is unknown: use one of {', '.join(MODES)}")
    if int(n_samples) < 1:
        raise QuantkitError(f"--n-samples {n_samples} (n_samples={n_samples}): calibration needs at least one sample")
    if int(seq_len) < 1:
        raise QuantkitError(f"--seq-len {seq_len} (seq_len={seq_len}): a calibration window needs at least one token")


def _token_cache(corpus: Corpus, tokenizer, mode: str, cache_dir) -> TokenCache:
    tokenizer_file = getattr(tokenizer, "path", None)
    directory = resolve_cache_dir(cache_dir)
    if tokenizer_file is None:
        log.warning("calibration: the tokenizer has no .path (its tokenizer.model); token ids are not cached")
        directory = None
    # What the ids depend on; the source's name and paths are metadata only (same text, same ids).
    key = {"text": corpus.fingerprint, "tokenizer": file_digest(tokenizer_file) if tokenizer_file else "",
           "bos": True, "joiner": corpus.joiner if mode == "random" else None}
    meta = {"source": corpus.name, "tokenizer_file": str(tokenizer_file), **corpus.details}
    expect = {"ids": torch.int32} if mode == "random" else {"ids": torch.int32, "doc_index": torch.int64,
                                                             "offsets": torch.int64}
    return TokenCache(directory, mode, key, meta, expect)


# ---- mode "random" ------------------------------------------------------------------------------


def text_ids(corpus: Corpus, tokenizer, cache: TokenCache) -> torch.Tensor:
    """(n_tokens,) int32: the joined text tokenized once with one BOS at the start; cached."""
    cached = cache.load()
    if cached is not None:
        return cached["ids"]
    text = corpus.text()
    log.info("calibration: tokenizing %s (%d characters)", corpus.name, len(text))
    start = time.perf_counter()
    ids = torch.tensor(tokenizer.encode(text, bos=True), dtype=torch.int32)
    log.info("calibration: %d tokens in %.1f s", len(ids), time.perf_counter() - start)
    cache.save({"ids": ids})
    return ids


def random_windows(ids: torch.Tensor, n_samples: int, seq_len: int, generator: torch.Generator,
                   name: str = "the text") -> torch.Tensor:
    """[n_samples, seq_len] windows of a token stream at distinct random start offsets."""
    n_starts = len(ids) - seq_len + 1  # a window starts anywhere its seq_len tokens fit
    if n_starts < 1:
        raise QuantkitError(f"{name}: the text has {len(ids)} tokens, fewer than --seq-len {seq_len}: "
                            f"use a longer text or a smaller --seq-len")
    if n_samples > n_starts:
        raise QuantkitError(f"{name}: {len(ids)} tokens leave room for only {n_starts} distinct windows of "
                            f"--seq-len {seq_len}, fewer than --n-samples {n_samples}: use a longer text, or a smaller "
                            f"--n-samples or --seq-len")
    starts = distinct_randint(n_starts, n_samples, generator)  # (n_samples,)
    return ids[starts[:, None] + torch.arange(seq_len)].long()  # (n_samples, seq_len)


def distinct_randint(high: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """n distinct integers in [0, high), drawn by rejection (high can be 10^8: no randperm of it)."""
    chosen: dict[int, None] = {}  # insertion-ordered set
    while len(chosen) < n:
        for value in torch.randint(high, (n - len(chosen),), generator=generator).tolist():
            chosen.setdefault(value)
    return torch.tensor(list(chosen)[:n], dtype=torch.long)


# ---- mode "document" ----------------------------------------------------------------------------


class DocumentIds:
    """Token ids of documents by index, each tokenized with BOS on first use; visited ones are cached."""

    def __init__(self, corpus: Corpus, tokenizer, cache: TokenCache):
        self.corpus, self.tokenizer, self.cache = corpus, tokenizer, cache
        self.ids: dict[int, torch.Tensor] = {}  # doc index -> (n_tokens,) int32
        self.added = 0
        cached = cache.load()
        if cached is not None:
            offsets = cached["offsets"].tolist()
            for row, index in enumerate(cached["doc_index"].tolist()):
                self.ids[index] = cached["ids"][offsets[row]:offsets[row + 1]]

    def __getitem__(self, index: int) -> torch.Tensor:
        if index not in self.ids:
            self.ids[index] = torch.tensor(self.tokenizer.encode(self.corpus.docs[index], bos=True), dtype=torch.int32)
            self.added += 1
        return self.ids[index]

    def save(self) -> None:
        """Write all known documents back (flat ids + offsets) when this run tokenized new ones."""
        if not self.added:
            return
        order = sorted(self.ids)
        lengths = torch.tensor([len(self.ids[i]) for i in order], dtype=torch.int64)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])  # (k + 1,)
        self.cache.save({"ids": torch.cat([self.ids[i] for i in order]), "offsets": offsets,
                         "doc_index": torch.tensor(order, dtype=torch.int64)})


def document_windows(corpus: Corpus, tokenizer, cache: TokenCache, n_samples: int, seq_len: int,
                     generator: torch.Generator) -> torch.Tensor:
    """[n_samples, seq_len]: one window at a random offset in each of n_samples random long documents."""
    docs = DocumentIds(corpus, tokenizer, cache)
    order = torch.randperm(len(corpus.docs), generator=generator).tolist()
    windows: list[torch.Tensor] = []
    longest = 0
    with tqdm(total=n_samples, desc="calibration documents", unit="doc", leave=False) as bar:
        for index in order:
            ids = docs[index]
            longest = max(longest, len(ids))
            if len(ids) < seq_len:
                continue
            start = int(torch.randint(len(ids) - seq_len + 1, (1,), generator=generator))
            windows.append(ids[start:start + seq_len])
            bar.update()
            if len(windows) == n_samples:
                break
    docs.save()  # also on failure: a retry with a smaller seq_len must not tokenize again
    if len(windows) < n_samples:
        raise _too_few_documents(corpus, len(windows), n_samples, seq_len, longest)
    return torch.stack(windows).long()


def _too_few_documents(corpus: Corpus, found: int, n_samples: int, seq_len: int, longest: int) -> QuantkitError:
    n_docs = len(corpus.docs)
    if found == 0:
        return QuantkitError(f"{corpus.name}: no document has --seq-len {seq_len} tokens (the longest of the {n_docs} "
                             f"has {longest} tokens): use a smaller --seq-len, or {RANDOM_MODE}, which joins the "
                             f"documents")
    return QuantkitError(f"{corpus.name}: only {found} of {n_docs} documents have at least --seq-len {seq_len} tokens, "
                         f"fewer than --n-samples {n_samples}: lower --n-samples or --seq-len, or use {RANDOM_MODE}, "
                         f"which joins the documents")


# ---- ready token ids ----------------------------------------------------------------------------


def ready_windows(tokens: torch.Tensor, name: str, vocab_size: int, n_samples: int, seq_len: int) -> torch.Tensor:
    """Token ids given by the caller, checked and used as they are: the first n_samples rows."""
    check_token_tensor(tokens, vocab_size, name)
    if tokens.shape[1] != seq_len:
        raise QuantkitError(f"{name}: windows of {tokens.shape[1]} tokens, but --seq-len {seq_len}: "
                            f"pass --seq-len {tokens.shape[1]} or re-cut the token ids")
    if tokens.shape[0] < n_samples:
        raise QuantkitError(f"{name}: {tokens.shape[0]} windows, fewer than --n-samples {n_samples}: "
                            f"pass --n-samples {tokens.shape[0]} or more token ids")
    if tokens.shape[0] > n_samples:
        log.info("calibration: using the first %d of the %d windows of %s", n_samples, tokens.shape[0], name)
    return tokens[:n_samples].to(torch.long, copy=True).contiguous()
