"""The pretraining_tp comparison: the numerical noise floor that quantization error is read against.

The same weights run with pretraining_tp = 1 and N (transformers 4.x's sliced q/k/v/o, gate/up/down
and lm_head; quantkit/model/llama.py) in fp16 and bf16, each against an fp32 pretraining_tp = 1
reference: max |dlogit|, KL(reference || run), top-1 agreement and perplexity. Rounding alone moves
the logits this much, so a quantized model whose KL is near these rows is as good as its dtype allows.

The reference logits of every compared window are kept in memory (fp32, windows x scored x vocab),
so the comparison runs on the first `max_windows` windows: by default as many as fit in 1 GiB.
"""

from __future__ import annotations

import logging

import torch

from quantkit.formats.reader import load_model
from quantkit.eval.data import EvalData
from quantkit.eval.fidelity import FidelityAccumulator, compare_tokens
from quantkit.eval.finite import FP16_MAX, check_numbers
from quantkit.eval.perplexity import perplexity_from_nll
from quantkit.eval.runner import batch_logits
from quantkit.errors import QuantkitError
from quantkit.model.llama import indivisible_dims

log = logging.getLogger(__name__)

CANDIDATE_TPS = (2, 4, 8)
REFERENCE_BUDGET = 1 << 30  # bytes of fp32 reference logits


def choose_tps(config, requested: list[int] | None) -> list[int]:
    """The tps to run: those of 2, 4, 8 that divide every dimension, or the requested ones, which must."""
    if not requested:
        return [tp for tp in CANDIDATE_TPS if not indivisible_dims(config, tp)]
    for tp in requested:
        bad = indivisible_dims(config, tp)
        if bad:
            raise QuantkitError(f"--tp {tp} does not divide {', '.join(bad)}: choose a divisor of every "
                                f"dimension (of 2, 4, 8 these do: {choose_tps(config, None) or 'none'})")
    return sorted(set(requested) - {1})


def subset(data: EvalData, max_windows: int | None, vocab_size: int) -> EvalData:
    if max_windows is None:
        per_window = data.seq_len * vocab_size * 4
        max_windows = max(1, REFERENCE_BUDGET // per_window)
    return EvalData(data.name, data.ids, data.windows[:max_windows], data.protocol, data.seq_len, data.stride)


@torch.no_grad()
def _logits(model, data: EvalData, batch_size: int, label: str, dtype: str) -> list[torch.Tensor]:
    out = []
    for ids, windows in data.batches(batch_size):
        out += batch_logits(model, ids, windows, label, data, cause=_cause(dtype))
    return out


def _variant(path, dtype: str, tp: int) -> str:
    """How messages name one run of the comparison."""
    return f"{path} (the --tp noise floor's {dtype}, pretraining_tp={tp} run)"


def _cause(dtype: str) -> str:
    """Why a run of the comparison went non-finite, and the fix: it always runs fp16 and bf16, whatever --dtype."""
    if dtype == "fp16":
        return (f"this model overflows fp16 (logits or activations beyond {FP16_MAX:g}), so its fp16 noise floor "
                f"cannot be measured: drop --tp, and evaluate it with --dtype bf16 or --dtype fp32")
    return "its weights or activations hold inf/NaN in that run: check the checkpoint's tensors, or drop --tp"


def _row(dtype: str, tp: int, logits: list[torch.Tensor], reference: list[torch.Tensor], data: EvalData,
         label: str) -> dict:
    """One row of the table; a QuantkitError naming `label` if any of its numbers is not finite."""
    fidelity = FidelityAccumulator()
    max_dlogit = 0.0
    for w, run, ref in zip(data.windows, logits, reference):
        max_dlogit = max(max_dlogit, (run - ref).abs().max().item())
        fidelity.add(compare_tokens(torch.log_softmax(ref, -1), torch.log_softmax(run, -1), data.targets(w)))
    summary, tokens = fidelity.summary("in-memory"), fidelity.tokens()
    row = {"dtype": dtype, "tp": tp, "max_abs_dlogit": max_dlogit, "kl_mean": summary["kl"]["mean"],
           "kl_p99": summary["kl"]["p99"], "top1": summary["top1"]["agreement"],
           "ppl": perplexity_from_nll(tokens["nll"], data).ppl}
    check_numbers(row, label, "tp", _cause(dtype))
    return row


def tp_comparison(path, data: EvalData, tps: list[int] | None = None, dtypes=("fp16", "bf16"), batch_size: int = 1,
                  max_windows: int | None = None, progress: bool = True, device: str = "cpu") -> dict:
    """The report's tp section for the model at `path` (dense or quantized)."""
    model = load_model(path, dtype="fp32", device=device)
    tps = choose_tps(model.config, tps)
    data = subset(data, max_windows, model.config.vocab_size)
    model.set_pretraining_tp(1)
    reference = _logits(model, data, batch_size, _variant(path, "fp32 reference", 1), "fp32")
    del model
    rows, unsupported = [], []
    for dtype in dtypes:
        model = load_model(path, dtype=dtype, device=device)  # from the file: no fp32 -> dtype double rounding
        for tp in [1, *tps]:
            try:
                model.set_pretraining_tp(tp)
            except QuantkitError as e:  # a layout that cannot be sliced (bitsandbytes, act-order, group alignment)
                if tp not in [u["tp"] for u in unsupported]:
                    unsupported.append({"tp": tp, "reason": str(e)})
                continue
            label = _variant(path, dtype, tp)
            rows.append(_row(dtype, tp, _logits(model, data, batch_size, label, dtype), reference, data, label))
            log.info("pretraining_tp %d %s: %s", tp, dtype, rows[-1])
        del model
    return {"model": str(path), "reference": f"fp32, pretraining_tp=1, {len(data.windows)} windows of {data.seq_len}",
            "rows": rows, "unsupported": unsupported}

