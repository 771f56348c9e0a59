"""Layer 1, the native Llama 2: config, layout (the module grammar, layer 0), modules (llama), checkpoint reading
(checkpoint, hub), building (build) and saving (save), tokenizer, generation. Imports layer 0 only (errors, dtypes,
io); knows nothing of quantization."""

from quantkit.model.checkpoint import Checkpoint

from quantkit.model.tokenizer import load_tokenizer

from quantkit.model.save import save_model
from quantkit.model.config import PRESETS, LlamaConfig, preset
from quantkit.model.generate import SamplingConfig, generate
from quantkit.model.llama import KVCache, LlamaForCausalLM
from quantkit.model.tokenizer import Tokenizer

__all__ = ["PRESETS", "Checkpoint", "KVCache", "LlamaConfig", "LlamaForCausalLM", "SamplingConfig", "Tokenizer",
           "generate", "load_tokenizer", "preset", "save_model"]
