"""Fixtures of the run tests (work directory, interrupted runs): a source checkpoint and calibration tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from quantkit.model import save_model
from tests.conftest import DEMO_MODEL, random_model, tiny_config
from tests.helpers import LAYERS


@pytest.fixture
def src(tmp_path) -> Path:
    save_model(random_model(tiny_config(num_hidden_layers=LAYERS)), tmp_path / "src", tokenizer_dir=DEMO_MODEL)
    (tmp_path / "src" / "quantkit_manifest.json").unlink(missing_ok=True)  # a source as the hub has it: edits allowed
    return tmp_path / "src"


@pytest.fixture
def tokens(tmp_path) -> Path:
    path = tmp_path / "calib.pt"
    torch.save(torch.randint(0, 4096, (8, 32), generator=torch.Generator().manual_seed(0)), path)
    return path
