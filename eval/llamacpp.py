"""A .gguf file run by llama.cpp, as `quantkit eval` and `compare` run a model.

`LlamaCppModel` wraps llama-cpp-python's `Llama` (llama.cpp's own loader and kernels, in its own precision: Q4_0 /
Q8_0 matmuls against activations quantized to 8 bits, F16 ones against fp16 activations, fp32 accumulation) as an
nn.Module whose forward takes token ids (B, T) and returns fp32 logits (B, T, vocab), one window at a time in a fresh
context, so that eval's windows, KL and perplexity are computed exactly as for quantkit's own models. A .gguf carries
its vocabulary as pieces, not as tokenizer.model: the text is tokenized by the base's tokenizer, and `check_tokenizer`
refuses a file that llama.cpp tokenizes otherwise.

llama-cpp-python is an optional dependency (`pip install quantkit[llamacpp]`; .ci/llamacpp-wheel.sh builds its
wheel once). `quantkit check` runs the same runtime in a subprocess (eval/runtime_worker.py) instead, where a crash
of llama.cpp is reported rather than fatal.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.eval.evaluate import ids_difference
from quantkit.formats.gguf import gguf_config, gguf_tensor_types
from quantkit.model.layout import linear_of

log = logging.getLogger(__name__)

DECODE_CONTEXT = 64  # tokens: the decode-speed measurement's prompt and its 32 new tokens fit
INSTALL = "pip install 'quantkit[llamacpp]' (or the wheel .ci/llamacpp-wheel.sh builds)"


def import_llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:
        raise QuantkitError(f"running a .gguf needs llama-cpp-python (llama.cpp's Python binding): {INSTALL} "
                            f"({e})") from None
    return llama_cpp


class LlamaCppModel(nn.Module):
    """A Llama GGUF in llama.cpp. config: its LlamaConfig (gguf_config); source_dir: the file (for messages).

    n_ctx: the longest window it will run (tokens). QuantkitError (one line) where llama-cpp-python is missing, or
    llama.cpp refuses the file."""

    def __init__(self, path: str | os.PathLike, n_ctx: int, threads: int | None = None):
        super().__init__()
        llama_cpp = import_llama_cpp()
        n_ctx = max(n_ctx, DECODE_CONTEXT)  # room for decode_tokens_per_s whatever the windows' length
        self.source_dir, self.config, self.n_ctx = Path(path), gguf_config(path), n_ctx
        self.version = f"llama.cpp (llama-cpp-python {llama_cpp.__version__})"
        try:
            self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                                       logits_all=True, verbose=False, n_threads=threads or torch.get_num_threads())
        except (ValueError, RuntimeError) as e:
            raise QuantkitError(f"{path}: llama.cpp did not load it ({e})") from None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = []
        for row in ids.tolist():
            if len(row) > self.n_ctx:
                raise QuantkitError(f"{self.source_dir}: a window of {len(row)} tokens is longer than the "
                                    f"{self.n_ctx} llama.cpp was opened for")
            self.llm.reset()
            self.llm.eval(row)
            rows.append(torch.from_numpy(np.array(self.llm.scores[:len(row)], dtype=np.float32)))
        return torch.stack(rows)

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's ids of `text`, BOS first (as quantkit's Tokenizer.encode)."""
        return self.llm.tokenize(text.encode(), add_bos=True, special=False)

    def check_tokenizer(self, tokenizer, text: str, base_name: str) -> None:
        """Refuse a file llama.cpp tokenizes otherwise than the base's `tokenizer` (on `text`: one window's)."""
        difference = ids_difference(self.tokenize(text), tokenizer.encode(text, bos=True))
        if difference is not None:
            raise QuantkitError(f"{self.source_dir}: llama.cpp tokenizes the text otherwise than the base {base_name}'s "
                                f"tokenizer ({difference}): its vocabulary is not the base's; compare a GGUF with the "
                                f"model it was made from")

    def runtime_arithmetic(self) -> str:
        """What llama.cpp runs the decoder linears in, for reports: e.g. 'llama.cpp (...): Q4_0 (28 linears)'."""
        kinds = Counter(kind for name, (kind, _) in gguf_tensor_types(self.source_dir).items()
                        if linear_of(name) is not None)
        return f"{self.version}: " + "; ".join(f"{k} ({n} linears)" for k, n in kinds.items())

    def decode_tokens_per_s(self, prompt: list[int], new_tokens: int = 32) -> float:
        """Greedy batch-1 decode speed in llama.cpp (its KV cache), after a short warm-up."""
        new_tokens = min(new_tokens, self.n_ctx - len(prompt) - 1)
        self.llm.reset()
        self.llm.eval(prompt)
        self.llm.eval([int(np.argmax(self.llm.scores[len(prompt) - 1]))])
        start = time.perf_counter()
        for _ in range(new_tokens):
            self.llm.eval([int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))])
        return new_tokens / (time.perf_counter() - start)

    def close(self) -> None:
        self.llm.close()


__all__ = ["LlamaCppModel", "import_llama_cpp"]
