"""Sharded safetensors writing that holds no more than the tensor being added.

safetensors is `u64 header length | JSON header | raw bytes`, and the header (names, dtypes, shapes,
offsets) must come first. `ShardWriter` appends each tensor's bytes to a spool file as it arrives
and writes header + spooled data when a shard closes, so a streamed 70B quantization never holds a
whole shard in memory. Shards are named as transformers names them, with the index file beside.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from pathlib import Path

import torch

from quantkit.dtypes import ST_DTYPES
from quantkit.errors import QuantkitError

SHARD_SIZE = "5GB"  # the largest safetensors shard by default: transformers' save_pretrained's (max_shard_size)

SAFETENSORS_SINGLE, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"


def parse_size(size: int | str) -> int:
    """'5GB' / '500MB' / '10KiB' / 123 -> bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", size, re.IGNORECASE)
    if m is None:
        raise QuantkitError(f"shard size {size!r} is not a size: write e.g. 5GB, 500MB or a number of bytes")
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    return int(float(m.group(1)) * units[(m.group(2) or "").upper()])


class ShardWriter:
    """add(name, tensor) in order; close() names the shards and writes the index (if more than one)."""

    def __init__(self, out_dir: str | os.PathLike, max_shard_size: int | str = SHARD_SIZE,
                 metadata: dict[str, str] | None = None):
        self.out_dir = Path(out_dir)
        self.max_shard_size = parse_size(max_shard_size)
        self.metadata = {"format": "pt", **(metadata or {})}
        self.shards: list[tuple[Path, list[str]]] = []  # (written file, tensor names)
        self.total_size = 0
        self._header: dict[str, dict] = {}
        self._spool = None
        self._spool_size = 0

    def add(self, name: str, tensor: torch.Tensor):
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
        if self._header and self._spool_size + len(data) > self.max_shard_size:
            self._finish_shard()
        if self._spool is None:
            self._spool = open(self.out_dir / f".spool-{len(self.shards)}", "wb")
        if name in self._header or any(name in names for _, names in self.shards):
            raise QuantkitError(f"tensor {name} written twice")
        self._header[name] = {"dtype": ST_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                              "data_offsets": [self._spool_size, self._spool_size + len(data)]}
        self._spool.write(data)
        self._spool_size += len(data)
        self.total_size += len(data)

    def _finish_shard(self):
        header = json.dumps({"__metadata__": self.metadata, **self._header}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # safetensors aligns the data to 8 bytes
        spool_path = Path(self._spool.name)
        self._spool.close()
        path = self.out_dir / f".shard-{len(self.shards)}"
        with open(path, "wb") as out, open(spool_path, "rb") as data:
            out.write(struct.pack("<Q", len(header)) + header)
            shutil.copyfileobj(data, out, length=16 << 20)
        spool_path.unlink()
        self.shards.append((path, list(self._header)))
        self._header, self._spool, self._spool_size = {}, None, 0

    def close(self) -> list[str]:
        """Finish the last shard, give the shards their final names; returns the file names."""
        if self._header or not self.shards:
            if self._spool is None:
                self._spool = open(self.out_dir / f".spool-{len(self.shards)}", "wb")
            self._finish_shard()
        n = len(self.shards)
        names = [SAFETENSORS_SINGLE] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        weight_map = {}
        for (path, tensors), file_name in zip(self.shards, names):
            path.rename(self.out_dir / file_name)
            weight_map.update(dict.fromkeys(tensors, file_name))
        if n > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
            (self.out_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return names


def write_safetensors(tensors: dict[str, torch.Tensor], out_dir: Path, max_shard_size: int | str = SHARD_SIZE,
                      metadata: dict[str, str] | None = None) -> list[str]:
    writer = ShardWriter(out_dir, max_shard_size, metadata)
    for name, t in tensors.items():
        writer.add(name, t)
    return writer.close()
