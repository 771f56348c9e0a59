"""Shared fixtures: tiny Llama configs and checkpoints built in-process; no network, no ../shared."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

from quantkit.model import LlamaConfig, LlamaForCausalLM, save_model
from tests.helpers import LAYERS

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "demo" / "model"
SHARED_MODEL = REPO.parent / "shared" / "models" / "tiny-llama2-mha"
DEMO_VOCAB = 4096
KERNEL_SHAPES = dict(hidden_size=128, intermediate_size=256)  # tiny_config's 4 heads (2 kv): every int4 kernel fits


def tiny_config(**overrides) -> LlamaConfig:
    """A Llama config small enough for unit tests (hidden 64, 2 layers)."""
    base = dict(vocab_size=DEMO_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, torch_dtype="float32")
    return LlamaConfig(**{**base, **overrides})


def random_model(config: LlamaConfig, seed: int = 0) -> LlamaForCausalLM:
    """Random weights with a realistic scale (std 0.02 linears, non-trivial norms)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.02 if "proj" in name or "lm_head" in name else 1.0)
    return model.eval()


def peaked_model(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """Random weights whose layers matter and whose next-token distributions are peaked, like a trained model's.

    With random_model's init the residual stream is mostly the embedding and every distribution is almost
    uniform over 4096 tokens, so quantization moves KL by ~1e-7, below what fp32 arithmetic resolves."""
    model = random_model(tiny_config(**overrides), seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
        for name, p in model.named_parameters():
            if "proj" in name:
                p.mul_(3)
    return model


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    caplog.set_level(logging.INFO, logger="quantkit")


@pytest.fixture(autouse=True)
def _same_threads():
    """torch's thread count as each test found it: a leaked change alters later tests' float results (a resumed
    subprocess run compared with an in-process one)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """torch on one thread for the test (BLAS splits sums differently with the thread count), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer_file() -> Path:
    path = DEMO_MODEL / "tokenizer.model"
    assert path.is_file(), f"the bundled demo tokenizer {path} is part of the repository"
    return path


@pytest.fixture
def tiny_model_dir(tmp_path, tokenizer_file) -> Path:
    """A saved tiny random model (fp32 safetensors) with the demo tokenizer."""
    model = random_model(tiny_config())
    out = tmp_path / "tiny"
    save_model(model, out, tokenizer_dir=tokenizer_file.parent)
    return out


@pytest.fixture
def kernel_model_dir(tmp_path, tokenizer_file):
    """A tiny model whose shapes fit the int4 kernels (hidden 128)."""
    out = tmp_path / "src"
    model = random_model(tiny_config(**KERNEL_SHAPES))
    save_model(model, out, tokenizer_dir=tokenizer_file.parent, dtype="fp16")
    return out


@pytest.fixture
def copy_dir(tmp_path):
    def copy(src: Path, name: str = "copy") -> Path:
        dst = tmp_path / name
        shutil.copytree(src, dst)
        return dst
    return copy


def install_plugin(root: Path, monkeypatch, module: str, source: str, entry_points: str):
    """A package `module` (its source) installed as a distribution on sys.path, with `entry_points` (INI text)."""
    (root / f"{module}.py").write_text(source)
    dist = root / f"{module}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(entry_points)
    monkeypatch.syspath_prepend(str(root))


# A source checkpoint as the hub has it and calibration tokens: the run tests' and every CLI pipeline test's.
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
