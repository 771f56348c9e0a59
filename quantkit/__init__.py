"""quantkit: quantize Llama 2 and measure what it cost."""

from __future__ import annotations

import os

from quantkit.errors import QuantkitError
from quantkit.model import LlamaConfig, LlamaForCausalLM, SamplingConfig, Tokenizer, generate, save_model
from quantkit.model.checkpoint import resolve_model_dir

__version__ = "0.1.0"


def load(path: str | os.PathLike, dtype=None, device: str = "cpu") -> LlamaForCausalLM:
    """Load a Hugging Face Llama directory (or hub id), dense or quantized, as a native model: `model(ids)` -> logits."""
    from quantkit.loading import load_model

    return load_model(path, dtype=dtype, device=device)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The sentencepiece tokenizer of a model directory (or a tokenizer.model file)."""
    path = os.fspath(path)
    return Tokenizer(path if path.endswith(".model") else resolve_model_dir(path))


# The quantization API imports torchao (slow, and noisy on CPU builds): load it on first use.
_LAZY = {"quantize": "quantkit.backends", "Recipe": "quantkit.backends", "BACKENDS": "quantkit.backends",
         "quantize_checkpoint": "quantkit.pipeline", "save_quantized": "quantkit.export",
         "ExportOptions": "quantkit.export", "CalibrationOptions": "quantkit.layerwise"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'quantkit' has no attribute {name!r}")


__all__ = ["BACKENDS", "CalibrationOptions", "ExportOptions", "Recipe", "quantize", "quantize_checkpoint", "save_quantized", "LlamaConfig", "LlamaForCausalLM", "QuantkitError", "SamplingConfig", "Tokenizer", "generate", "load",
           "load_tokenizer", "save_model"]
