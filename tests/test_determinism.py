"""The same quantize (or save) twice writes byte-identical files, for every method x format."""

from __future__ import annotations

import pytest
import torch

from quantkit.backends.bnb import BnbFP4Config, BnbInt8Config, BnbNF4Config
from quantkit.backends.gptq import GPTQConfig
from quantkit.backends.int4 import Int4Config
from quantkit.backends.rtn import RTNConfig
from quantkit.run.export import ExportOptions
from quantkit.io.manifest import MANIFEST_FILE, read_manifest, sha256_file
from quantkit.model import save_model
from quantkit.run.pipeline import quantize_checkpoint
from tests.conftest import random_model, tiny_config

pytestmark = pytest.mark.slow  # every method and format twice: `make test-fast` leaves it out

CALIB = torch.randint(3, 4096, (4, 16), generator=torch.Generator().manual_seed(0))
CASES = [(Int4Config(32), "compressed-tensors"), (Int4Config(32), "gptq"),
         (RTNConfig(4, 32), "compressed-tensors"), (RTNConfig(3, 32, True), "gptq"),
         (GPTQConfig(4, 32), "gptq"), (GPTQConfig(4, 32, desc_act=True), "gptq"),
         (GPTQConfig(4, 32), "compressed-tensors"),
         (BnbInt8Config(), "bnb"), (BnbNF4Config(), "bnb"), (BnbFP4Config(double_quant=False), "bnb")]


def digests(d) -> dict[str, str]:
    """Every file's sha256, the manifest's included."""
    return {p.relative_to(d).as_posix(): sha256_file(p) for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("config, fmt", CASES, ids=lambda c: c if isinstance(c, str) else c.describe())
def test_quantize_twice_writes_identical_bytes(tiny_model_dir, tmp_path, config, fmt):
    calibration = CALIB if config.method == "gptq" else None
    for out in ("a", "b"):
        quantize_checkpoint(tiny_model_dir, config, tmp_path / out, ExportOptions(format=fmt, max_shard_size="300KB"),
                            calibration=calibration, progress=False)
    a, b = digests(tmp_path / "a"), digests(tmp_path / "b")
    assert len(a) > 6 and MANIFEST_FILE in a  # sharded, with an index
    assert a == b
    assert set(read_manifest(tmp_path / "a")) == set(a) - {MANIFEST_FILE}


def test_save_model_twice_writes_identical_bytes(tmp_path, tokenizer_file):
    for out in ("a", "b"):
        save_model(random_model(tiny_config()), tmp_path / out, tokenizer_dir=tokenizer_file.parent,
                   max_shard_size="300KB", dtype="bf16")
    a, b = digests(tmp_path / "a"), digests(tmp_path / "b")
    assert "model.safetensors.index.json" in a and a == b
