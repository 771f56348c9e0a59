"""`quantkit eval` and `quantkit compare` as library calls: load, check, evaluate, assemble the report.

One model in memory at a time besides the base; with saved base logits (`base_logits=`), none
besides the evaluated one, which is what makes a 70B comparison possible on one machine.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from quantkit.formats.reader import load_model
from quantkit.model.tokenizer import load_tokenizer
from quantkit.model.llama import LlamaForCausalLM
from quantkit.eval.base_logits import BaseLogits, save_base_logits
from quantkit.eval.data import EvalData
from quantkit.eval.evaluate import (EvalResult, build_report, check_same_tokenizer, check_same_vocabulary, decode_tokens_per_s,
                           evaluate, layer_errors, model_entry, model_info)
from quantkit.eval.perplexity import PerplexityResult, perplexity_from_nll
from quantkit.eval.tp import choose_tps, tp_comparison
from quantkit.errors import QuantkitError
from quantkit.io.files import check_writable
import quantkit.dist as dist
from quantkit.formats.gguf import is_gguf
from quantkit.formats.reader import model_config, open_checkpoint
from quantkit.quant.linear import arithmetic

log = logging.getLogger(__name__)


@dataclass
class EvalOptions:
    compute_dtype: str | None = None  # what the models compute in (the CLI's --dtype); None: each checkpoint's own
    device: str = "cpu"  # where the models run (cpu, cuda)
    batch_size: int = 1
    speed: bool = True  # measure decode tokens/s
    tps: list[int] | None = None  # pretraining_tp comparison: None = off, [] = the divisors of 2, 4, 8
    tp_windows: int | None = None
    progress: bool = True
    command: str | None = None  # recorded in the report
    sensitivity: dict = field(default_factory=dict)  # unit, config, calibration: see eval.sensitivity


def _load(path, tokenizer, options: EvalOptions, base_name: str, data: EvalData):
    """The model at `path` after checking that it shares the base's `tokenizer`: a directory as quantkit's model,
    a .gguf run by llama.cpp (eval.llamacpp), which must tokenize the first window's text as the base does."""
    if not is_gguf(path):
        check_same_tokenizer(load_tokenizer(path), tokenizer, str(path), base_name)
        return load_model(path, dtype=options.compute_dtype, device=options.device)
    from quantkit.eval.llamacpp import LlamaCppModel

    if options.compute_dtype is not None:
        log.info("%s: llama.cpp computes in its own precision; --dtype applies to quantkit's models only", path)
    model = LlamaCppModel(path, n_ctx=data.seq_len)
    first = data.windows[0]
    model.check_tokenizer(tokenizer, tokenizer.decode(data.ids[first.start:first.end].tolist()), base_name)
    return model


def tokenizer_of(path, base):
    """The tokenizer of a model directory; for a .gguf (which carries no tokenizer.model) its base's."""
    if not is_gguf(path):
        return load_tokenizer(path)
    if base is None:
        raise QuantkitError(f"{path}: a .gguf carries no tokenizer.model: give --base (the directory it was made "
                            f"from), whose tokenizer llama.cpp's is checked against")
    return load_tokenizer(base)


def _speed(model, tokenizer, options: EvalOptions) -> float | None:
    """Decode tokens/s, measured by rank 0 alone under torchrun (the others start on their windows)."""
    return decode_tokens_per_s(model, tokenizer) if options.speed and dist.is_main() else None


def _check_world(options: EvalOptions) -> None:
    """What runs in one process only, refused before any work under torchrun (N > 1 ranks)."""
    if dist.world_size() == 1:
        return
    given = [flag for flag, on in (("--tp", options.tps is not None), ("--sensitivity", bool(options.sensitivity)))
             if on]
    if given:
        raise QuantkitError(f"{', '.join(given)} run(s) in one process: run without torchrun (it has "
                            f"{dist.world_size()} ranks)")


def _base_reference(base, base_logits, data: EvalData, tokenizer, model_path, vocab_size: int, options: EvalOptions):
    """(reference for evaluate, its report entry or None)."""
    if base is not None and base_logits is not None:
        raise QuantkitError("give --base or --base-logits, not both")
    if base_logits is not None:
        saved = BaseLogits(base_logits)
        saved.check_matches(data, vocab_size, tokenizer)
        return saved, saved.model_info or None
    if base is None:
        return None, None
    check_same_tokenizer(tokenizer, load_tokenizer(base), str(model_path), str(base))  # a .gguf's: the base's
    model = load_model(base, dtype=options.compute_dtype, device=options.device)
    return model, {**model_info(base), "arithmetic": arithmetic(model), "tokens_per_s": _speed(model, tokenizer, options)}


def _base_entry(info: dict | None, perplexity: PerplexityResult | None) -> dict | None:
    """The report's base entry: `info` (with its tokens_per_s) and the base's perplexity on this run."""
    if info is None or perplexity is None:
        return None
    return model_entry(info, EvalResult(perplexity), info.get("tokens_per_s"))


def _check_tps(path, options: EvalOptions) -> None:
    """A --tp that does not divide the shapes fails before any evaluation."""
    if options.tps and is_gguf(path):
        raise QuantkitError(f"{path}: --tp compares quantkit's pretraining_tp arithmetic: it runs no .gguf")
    if options.tps:
        choose_tps(open_checkpoint(path).config, options.tps)


def _tp_section(path, data: EvalData, options: EvalOptions) -> dict | None:
    if options.tps is None:
        return None
    return tp_comparison(path, data, options.tps, batch_size=options.batch_size, max_windows=options.tp_windows,
                         progress=options.progress, device=options.device)


def run_eval(model_path, data: EvalData, base=None, base_logits=None, save_logits=None, top_k: int | None = None,
             options: EvalOptions | None = None) -> dict:
    """The report of one model: perplexity; fidelity against `base` (a path) or `base_logits` (a .qkl file);
    with `save_logits`, the model's own log-probs saved as a base for later runs."""
    options = options or EvalOptions()
    _check_world(options)
    _check_tps(model_path, options)
    if save_logits is not None:
        check_writable(save_logits)  # before the base and the model run
    if options.sensitivity and is_gguf(model_path):
        raise QuantkitError(f"{model_path}: --sensitivity quantizes quantkit's model of a directory, not a .gguf")
    tokenizer = tokenizer_of(model_path, base)
    info = model_info(model_path)
    reference, reference_info = _base_reference(base, base_logits, data, tokenizer, model_path,
                                                model_config(model_path).vocab_size, options)
    model = _load(model_path, tokenizer, options, str(base), data) if is_gguf(model_path) else \
        load_model(model_path, dtype=options.compute_dtype, device=options.device)
    if isinstance(reference, LlamaForCausalLM):
        check_same_vocabulary(model, reference, str(model_path), str(base))
    speed = _speed(model, tokenizer, options)
    if save_logits is not None:
        save_base_logits(model, tokenizer, data, save_logits, top_k, options.batch_size, options.progress,
                         model_info={**info, "tokens_per_s": speed})
    if save_logits is not None and reference is None:  # the perplexity is in the file: no second pass
        result = EvalResult(perplexity_from_nll(BaseLogits(save_logits).target_nll(data), data)) \
            if dist.is_main() else None
    else:
        result = evaluate(model, data, base=reference, batch_size=options.batch_size, progress=options.progress,
                          label=str(model_path), base_label=None if base is None else f"the base {base}")
    del reference
    if result is None:  # a rank other than 0 under torchrun: rank 0 reports
        return None
    sensitivity = _sensitivity(model, data, options)
    entry = model_entry({**info, "arithmetic": arithmetic(model)}, result, speed, layer_errors(model_path), sensitivity)
    del model
    return build_report(data, [entry], _base_entry(reference_info, result.base_perplexity),
                        _tp_section(model_path, data, options), options.command)


def _sensitivity(model, data: EvalData, options: EvalOptions) -> dict | None:
    if not options.sensitivity:
        return None
    from quantkit.eval.sensitivity import sensitivity

    s = options.sensitivity
    return sensitivity(model, data, s["config"], s["unit"], options.batch_size, s.get("calibration"), options.progress)


def run_compare(base_path, model_paths: list, data: EvalData, base_logits=None,
                options: EvalOptions | None = None) -> dict:
    """One report: the base, then every model against it (KL etc.), one model in memory at a time."""
    options = options or EvalOptions()
    if not model_paths:
        raise QuantkitError("compare needs at least one model besides the base")
    _check_world(options)
    _check_tps(base_path, options)
    tokenizer = load_tokenizer(base_path)
    base_info = model_info(base_path)
    if base_logits is not None:
        reference = BaseLogits(base_logits)
        reference.check_matches(data, open_checkpoint(base_path).config.vocab_size, tokenizer)
        base_info["tokens_per_s"] = reference.model_info.get("tokens_per_s")  # measured when it was saved
    else:
        reference = load_model(base_path, dtype=options.compute_dtype, device=options.device)
        base_info.update(arithmetic=arithmetic(reference), tokens_per_s=_speed(reference, tokenizer, options))
    entries, base_perplexity = [], None
    for path in model_paths:
        model = _load(path, tokenizer, options, str(base_path), data)
        if isinstance(reference, BaseLogits):
            reference.check_matches(data, model.config.vocab_size, tokenizer)
        else:
            check_same_vocabulary(model, reference, str(path), str(base_path))
        result = evaluate(model, data, base=reference, batch_size=options.batch_size, progress=options.progress,
                          desc=os.path.basename(os.fspath(path).rstrip("/")), label=str(path),
                          base_label=None if base_logits is not None else f"the base {base_path}")
        if result is None:  # a rank other than 0 under torchrun: rank 0 reports
            del model
            continue
        base_perplexity = result.base_perplexity
        entries.append(model_entry({**model_info(path), "arithmetic": arithmetic(model)}, result,
                                   _speed(model, tokenizer, options), layer_errors(path)))
        del model
    del reference
    if not dist.is_main():
        return None
    return build_report(data, entries, _base_entry(base_info, base_perplexity), _tp_section(base_path, data, options),
                        options.command)
