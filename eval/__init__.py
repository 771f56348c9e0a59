"""Evaluation: perplexity (and, as the project grows, logit fidelity and reports)."""

from eval.perplexity import PerplexityResult, perplexity, token_windows

__all__ = ["PerplexityResult", "perplexity", "token_windows"]
