"""Evaluation: perplexity, logit fidelity against a base model, the pretraining_tp noise floor, reports.
Layer 5 (installed as quantkit.eval): imports layers 0-4 (models, formats, a run for --sensitivity); never the CLI.

    >>> data = eval_data(tokenizer, "wikitext2", seq_len=2048)          # or a local file
    >>> result = evaluate(quantized, data, base=fp16_model)             # or base=BaseLogits("base.qkl")
    >>> result.perplexity.ppl, result.fidelity["kl"]["mean"]
"""

from quantkit.eval.base_logits import BaseLogits, MemoryBaseLogits, save_base_logits
from quantkit.eval.data import EvalData, eval_data, text_data, token_windows
from quantkit.eval.evaluate import EvalResult, evaluate
from quantkit.eval.perplexity import PerplexityResult, perplexity, perplexity_of

__all__ = ["BaseLogits", "EvalData", "EvalResult", "MemoryBaseLogits", "PerplexityResult", "eval_data", "evaluate",
           "perplexity", "perplexity_of", "save_base_logits", "text_data", "token_windows"]
