"""quantkit: quantize Llama 2 and measure what it cost."""

from __future__ import annotations

import os

from typing import TYPE_CHECKING

from quantkit.errors import QuantkitError
from quantkit.version import __version__

if TYPE_CHECKING:
    from quantkit.model import LlamaForCausalLM, Tokenizer



def load(path: str | os.PathLike, dtype=None, device: str = "cpu") -> LlamaForCausalLM:
    """Load a Hugging Face Llama directory (or hub id), dense or quantized, as a native model: `model(ids)` -> logits."""
    from quantkit.formats.reader import load_model

    return load_model(path, dtype=dtype, device=device)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The sentencepiece tokenizer of a model directory (or a tokenizer.model file)."""
    from quantkit.model.tokenizer import load_tokenizer

    return load_tokenizer(path)


# Everything that imports torch loads on first use: `import quantkit` stays cheap (the command line's entry
# point, quantkit.entry, can then turn a Ctrl-C during the imports into one line), and the quantization API
# imports torchao (slow, and noisy on CPU builds).
_LAZY = {"LlamaConfig": "quantkit.model", "LlamaForCausalLM": "quantkit.model", "SamplingConfig": "quantkit.model",
         "Tokenizer": "quantkit.model", "generate": "quantkit.model", "save_model": "quantkit.model",
         "quantize": "quantkit.backends", "Recipe": "quantkit.backends", "BACKENDS": "quantkit.backends",
         "quantize_checkpoint": "quantkit.run.pipeline", "save_quantized": "quantkit.run.export",
         "ExportOptions": "quantkit.run.export", "CalibrationOptions": "quantkit.run.calibrator"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'quantkit' has no attribute {name!r}")


__all__ = ["BACKENDS", "CalibrationOptions", "ExportOptions", "Recipe", "quantize", "quantize_checkpoint", "save_quantized", "LlamaConfig", "LlamaForCausalLM", "QuantkitError", "SamplingConfig", "Tokenizer", "generate", "load",
           "load_tokenizer", "save_model"]
