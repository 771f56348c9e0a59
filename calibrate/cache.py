"""On-disk cache of token ids: a calibration source is tokenized once per (text, tokenizer, mode).

Tokenizing WikiText-2's train split with sentencepiece takes seconds to minutes; the ids are kept
as safetensors under `cache_dir` (default `$QUANTKIT_CACHE/calib`, else `~/.cache/quantkit/calib`).
The file name is a hash of what the ids depend on: the text's content hash (documents framed so
that boundaries count, and the joiner in mode "random"), the tokenizer.model bytes, the mode and a
format version. Sampling parameters (seed, n_samples, seq_len) are not part of the key: the cache
holds tokenizations, sampling is cheap. Files are written atomically (quantkit.io.files.atomic_file), so a
reader never sees half a file; an unwritable cache directory costs speed, not correctness.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from quantkit.errors import QuantkitError
from quantkit.io.files import atomic_file

log = logging.getLogger("quantkit.calibrate")

CACHE_ENV = "QUANTKIT_CACHE"
FORMAT = "quantkit-calib-tokens-1"


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """cache_dir if given, else $QUANTKIT_CACHE/calib, else ~/.cache/quantkit/calib."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    root = os.environ.get(CACHE_ENV)
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "quantkit") / "calib"


def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_key(parts: dict) -> str:
    blob = json.dumps({"format": FORMAT, **parts}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


class TokenCache:
    """One cache entry: a dict of 1-D tensors in `<dir>/<mode>-<key>.safetensors`; `directory=None` disables it."""

    def __init__(self, directory: Path | None, mode: str, key: dict, meta: dict, expect: dict[str, torch.dtype]):
        self.path = None if directory is None else directory / f"{mode}-{cache_key({'mode': mode, **key})}.safetensors"
        self.meta = {k: str(v) for k, v in {"mode": mode, **key, **meta}.items()}  # safetensors metadata: str -> str
        self.expect = expect  # name -> dtype every entry must hold

    def load(self) -> dict[str, torch.Tensor] | None:
        if self.path is None or not self.path.is_file():
            return None
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(self.path))
        except (SafetensorError, OSError) as e:
            log.warning("calibration cache %s is unreadable (%s); tokenizing again", self.path, e)
            return None
        if {k: t.dtype for k, t in tensors.items() if t.dim() == 1} != self.expect:
            log.warning("calibration cache %s holds %s, not %s; tokenizing again", self.path,
                        {k: str(t.dtype) for k, t in tensors.items()}, {k: str(v) for k, v in self.expect.items()})
            return None
        log.info("calibration: token ids from the cache %s", self.path)
        return tensors

    def save(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.path is None:
            return
        from safetensors.torch import save_file

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(self.path) as tmp:
                save_file({k: t.contiguous() for k, t in tensors.items()}, str(tmp),
                          metadata={"format": FORMAT, **self.meta})
        except (OSError, QuantkitError) as e:  # a cache is an optimisation: an unwritable one is no reason to stop
            log.warning("calibration: could not write the token cache %s (%s); the next run tokenizes again "
                        "(set cache_dir or $%s to a writable directory)", self.path, e, CACHE_ENV)
            return
        log.info("calibration: token ids cached in %s", self.path)

