"""Metrics that come out NaN or infinite are errors, never numbers in a report.

Checked at the source, each window's logits as they leave the model (cheap next to the forward), so
the message names the model, the window and its tokens; and once more on every summary number, which
guards whatever the first check cannot see (a damaged base-logits file, an exp() overflow).
"""

from __future__ import annotations

import math
from numbers import Real

import torch

from quantkit.dtypes import overflow_hint, short_name
from quantkit.errors import QuantkitError

FP16_MAX = 65504.0  # the largest finite fp16: activations or logits beyond it become inf, then NaN
DEFAULT_FIX = ("a NaN or infinite metric is not a result: rerun with --dtype fp32, or check the inputs "
               "(a damaged --base-logits file, a checkpoint holding inf/NaN)")


def model_label(model) -> str:
    """How messages name a model: the directory it was loaded from, else 'the model'."""
    source = getattr(model, "source_dir", None)
    return str(source) if source is not None else "the model"


def check_logits(logits: torch.Tensor, window, label: str, dtype: torch.dtype, data=None,
                 cause: str | None = None) -> None:
    """Raise if a window's logits (n_scored, vocab) hold inf or NaN; the message names the window (its index
    in `data`, an EvalData, when given) and its tokens."""
    finite = torch.isfinite(logits).all(-1)  # (n_scored,)
    if bool(finite.all()):
        return
    first = int((~finite).nonzero()[0, 0]) + window.score_from  # the first target token whose prediction is bad
    index = data.windows.index(window) if data is not None and window in data.windows else None
    where = f"window {index} " if index is not None else "the window "
    raise QuantkitError(f"{label}: non-finite logits in {where}(tokens {window.start}-{window.end}, first at token "
                        f"{first}) computed in {short_name(dtype)}: {cause or overflow_hint(dtype)}")


def check_numbers(values, label: str, what: str, cause: str | None = None) -> None:
    """Raise naming the first key of `values` (nested dicts, lists, numbers) that is NaN or infinite."""
    for key, value in _numbers(values, what):
        if not math.isfinite(value):
            raise QuantkitError(f"{label}: {key} came out {value}: {cause or DEFAULT_FIX}")


def _numbers(values, key: str):
    if isinstance(values, dict):
        for k, v in values.items():
            yield from _numbers(v, f"{key}.{k}")
    elif isinstance(values, (list, tuple)):
        for i, v in enumerate(values):
            yield from _numbers(v, f"{key}[{i}]")
    elif isinstance(values, Real) and not isinstance(values, bool):
        yield key, float(values)
