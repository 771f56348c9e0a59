"""The native Llama 2: config, modules, checkpoint I/O, tokenizer, generation."""

from quantkit.model.checkpoint import Checkpoint

from quantkit.model.tokenizer import load_tokenizer

from quantkit.model.save import save_model
from quantkit.model.config import PRESETS, LlamaConfig, preset
from quantkit.model.generate import SamplingConfig, generate
from quantkit.model.llama import KVCache, LlamaForCausalLM
from quantkit.model.tokenizer import Tokenizer

__all__ = ["PRESETS", "Checkpoint", "KVCache", "LlamaConfig", "LlamaForCausalLM", "SamplingConfig", "Tokenizer",
           "generate", "load_tokenizer", "preset", "save_model"]
