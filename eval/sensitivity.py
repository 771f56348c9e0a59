"""Sensitivity: quantize one decoder layer (or one linear type) at a time and measure its KL contribution.

Each variant is a copy of the base model with only that part quantized by the given config; its KL
against the base (on the evaluation windows, base log-probs computed once and kept in memory in the
.qkl uint16 encoding) says how much that part alone costs, so a user can see which layers to keep
at higher precision (a recipe rule, or --ignore).
"""

from __future__ import annotations

import copy
import re

from quantkit.eval.base_logits import MemoryBaseLogits
from quantkit.eval.data import EvalData
from quantkit.eval.evaluate import config_label, evaluate
from quantkit.eval.finite import model_label
from quantkit.errors import QuantkitError
from quantkit.model.layout import DECODER_LINEARS, layer_prefix

UNITS = ("layer", "linear")


def parts(config, unit: str) -> list[tuple[str, str]]:
    """(row name, ignore pattern keeping everything else in full precision) per variant."""
    if unit == "layer":
        return [(f"layer {i}", "^(?!" + re.escape(layer_prefix(i)) + ")") for i in range(config.num_hidden_layers)]
    if unit == "linear":
        return [(name, rf"^(?!.*\.{re.escape(name)}$)") for name in DECODER_LINEARS]
    raise QuantkitError(f"--sensitivity {unit!r}: choose one of {', '.join(UNITS)}")


def sensitivity(base, data: EvalData, config, unit: str = "layer", batch_size: int = 1, calibration=None,
                progress: bool = True) -> dict:
    """The report's sensitivity object: per variant, mean KL (with stderr) against `base` and perplexity.

    `calibration`: token ids (n, seq_len) for methods that need calibration (gptq).
    """
    from quantkit.backends import needs_calibration, quantize, runnable_recipe
    from quantkit.run.calibrator import quantize_calibrated

    calibrated = needs_calibration(runnable_recipe(config, calibrated=calibration is not None))
    variants = parts(base.config, unit)
    reference = MemoryBaseLogits(base, data, batch_size=batch_size, progress=progress)
    rows = []
    for name, keep_rest in variants:
        model = copy.deepcopy(base)
        if calibrated:
            quantize_calibrated(model, config, calibration, ignore=(keep_rest,), progress=False)
        else:
            quantize(model, config, ignore=(keep_rest,))
        result = evaluate(model, data, base=reference, batch_size=batch_size, progress=progress, desc=name,
                          label=f"{model_label(base)} with {name} quantized ({config_label(config)}, --sensitivity)")
        kl = result.fidelity["kl"]
        rows.append({"name": name, "kl_mean": kl["mean"], "kl_stderr": kl["stderr"], "ppl": result.perplexity.ppl})
        del model
    return {"unit": unit, "method": config_label(config), "rows": rows}
