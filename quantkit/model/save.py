"""A native model saved in Hugging Face's layout (config.json, safetensors shards, tokenizer files, quantkit's
sha256 manifest), atomically."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path

from quantkit.dtypes import dtype_name, parse_dtype
from quantkit.io.files import atomic_dir
from quantkit.io.manifest import write_manifest
from quantkit.io.shards import SHARD_SIZE, write_safetensors
from quantkit.model.checkpoint import cast_float
from quantkit.model.llama import LlamaForCausalLM
from quantkit.model.tokenizer import TOKENIZER_FILES

log = logging.getLogger(__name__)


def copy_tokenizer_files(src_dir: Path | None, out_dir: Path):
    if src_dir is None:
        return
    for name in TOKENIZER_FILES:
        if (Path(src_dir) / name).is_file():
            shutil.copy2(Path(src_dir) / name, out_dir / name)


def save_model(model: LlamaForCausalLM, out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
               max_shard_size: int | str = SHARD_SIZE, dtype=None, overwrite: bool = False) -> Path:
    """Save in Hugging Face's layout: config.json, safetensors (sharded with an index), tokenizer files, and
    quantkit_manifest.json (every file's size and sha256)."""
    dtype = parse_dtype(dtype)
    config = model.config
    tensors = {k: cast_float(v, dtype) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # as transformers does: the embedding is the lm_head
    saved_dtype = dtype or model.model.embed_tokens.weight.dtype  # what the files hold, not what config said
    config = dataclasses.replace(config, torch_dtype=dtype_name(saved_dtype))
    tokenizer_dir = tokenizer_dir if tokenizer_dir is not None else getattr(model, "source_dir", None)
    with atomic_dir(out_dir, overwrite, keep=[tokenizer_dir]) as tmp:
        write_safetensors(tensors, tmp, max_shard_size)
        (tmp / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
        copy_tokenizer_files(tokenizer_dir, tmp)
        write_manifest(tmp)  # last: it covers every other file
    log.info("saved %d tensors to %s", len(tensors), out_dir)
    return Path(out_dir)
