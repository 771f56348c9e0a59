"""One pass of a model over the evaluation windows: perplexity, and fidelity against a base when given one.

The base is another model in memory (its log-probs are computed on the same batch, exactly) or
saved base logits (`eval.base_logits`: a .qkl file, or the same encoding in memory), read window by
window. Also here: what a model directory is (method, bits per weight, size on disk) and its decode
speed, for the report's model entries.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

import quantkit.dist as dist
from quantkit.eval.data import EvalData
from quantkit.eval.fidelity import FidelityAccumulator, compare_tokens
from quantkit.eval.finite import check_numbers, model_label
from quantkit.eval.perplexity import PerplexityResult, perplexity_from_nll, perplexity_of
from quantkit.eval.runner import batch_logprobs
from quantkit.errors import QuantkitError
from quantkit.quant.affine import PER_CHANNEL
from quantkit.dtypes import ST_ITEMSIZE, short_name
from quantkit.formats.gguf import gguf_config, gguf_recipe, gguf_tensor_types, is_gguf
from quantkit.formats.reader import QuantizedCheckpoint, open_checkpoint
from quantkit.model.layout import checkpoint_shapes, layer_index, linear_of
from quantkit.model.generate import SamplingConfig, generate
from quantkit.quant.linear import int4_kernels
from quantkit.version import __version__
from quantkit.quant.record import bits_per_weight



@dataclass
class EvalResult:
    perplexity: PerplexityResult
    base_perplexity: PerplexityResult | None = None
    fidelity: dict | None = None


def check_same_vocabulary(model, base, model_name: str, base_name: str) -> None:
    if model.config.vocab_size != base.config.vocab_size:
        raise QuantkitError(f"{model_name} has a vocabulary of {model.config.vocab_size}, the base {base_name} "
                            f"{base.config.vocab_size}: compare models that share a tokenizer")


def ids_difference(got: list[int], expected: list[int]) -> str | None:
    """Where two tokenizations of one text part ('N ids against M, first difference at id i'), or None if equal."""
    if got == expected:
        return None
    at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
    return f"{len(got)} ids against {len(expected)}, first difference at id {at}"


def check_same_tokenizer(tokenizer, base_tokenizer, model_name: str, base_name: str) -> None:
    if tokenizer.fingerprint() != base_tokenizer.fingerprint():
        raise QuantkitError(f"{model_name} and the base {base_name} have different tokenizer.model files "
                            f"(another tokenizer): compare models that share a tokenizer")


@torch.no_grad()
def evaluate(model, data: EvalData, base=None, batch_size: int = 1, progress: bool = True,
             desc: str = "eval", label: str | None = None, base_label: str | None = None) -> EvalResult:
    """Perplexity of `model`; with `base` (a model, or saved base logits: eval.base_logits) also fidelity against it.

    Anything NaN or infinite (a window's logits, a summary number) is a QuantkitError naming `label` (default:
    the model's directory) or, for the base's, `base_label` (default: "the base" and its directory or file).
    Under torchrun (quantkit.dist) each rank runs its share of the windows and rank 0 sums them all in window order:
    the result is a single process's (bit for bit at batch size 1 and equal threads per process); None on the other
    ranks. An error on any rank is raised on every rank.
    """
    label = label or model_label(model)
    if base is None:
        perplexity = perplexity_of(model, data, batch_size, progress, label)
        return EvalResult(perplexity) if perplexity is not None else None
    base_label = base_label or f"the base {model_label(base) if isinstance(base, nn.Module) else base_name(base)}"
    per_window = dist.gather_ordered(dist.collective(lambda: window_fidelity(model, data, base, batch_size, progress,
                                                                            desc, label, base_label)))
    if per_window is None:  # a rank other than 0 under torchrun: rank 0 reports
        return None
    fidelity = FidelityAccumulator()
    for tokens in per_window:  # window order: the sums are a single process's
        fidelity.add(tokens)
    tokens = fidelity.tokens()
    source = "in-memory" if isinstance(base, nn.Module) else "base-logits"
    result = EvalResult(perplexity_from_nll(tokens["nll"], data), perplexity_from_nll(tokens["base_nll"], data),
                        fidelity.summary(source, None if isinstance(base, nn.Module) else base.top_k))
    check_numbers(result.base_perplexity.report(), base_label, "perplexity")
    check_numbers(result.perplexity.report(), label, "perplexity")
    check_numbers(result.fidelity, label, "fidelity")
    return result


def window_fidelity(model, data: EvalData, base, batch_size: int, progress: bool, desc: str, label: str,
                    base_label: str) -> list[tuple[int, dict]]:
    """(index in data.windows, compare_tokens' per-token measures) of this rank's share of the windows (all of them in
    one process): the model's log-probs against the base's (a model, or saved base logits)."""
    local, indices = data.shard()
    scores = []
    with tqdm(total=len(local.windows), desc=desc, unit="window",
              disable=not progress or not dist.is_main()) as bar:  # closed on errors too
        for ids, windows in local.batches(batch_size):
            logprobs = batch_logprobs(model, ids, windows, label, data)  # data: messages name the global window
            base_scores = (batch_logprobs(base, ids, windows, base_label, data) if isinstance(base, nn.Module)
                           else [base.window(w) for w in windows])
            scores += [compare_tokens(base_lp, lp, data.targets(w)) for w, lp, base_lp in
                       zip(windows, logprobs, base_scores)]
            bar.update(len(windows))
    return list(zip(indices, scores))


def base_name(base) -> str:
    """Saved base logits are named by their file."""
    return str(getattr(base, "path", "(saved base logits)"))


# -- what a model directory is --------------------------------------------------------------------


def model_info(path: str | os.PathLike) -> dict:
    """name, path, method, bits_per_weight (decoder linears, scales included), size_bytes (weight files)."""
    if is_gguf(path):
        return gguf_info(path)
    ckpt = open_checkpoint(path)
    files = sorted(set(ckpt.weight_map.values()))
    return {"name": ckpt.dir.name, "path": str(path), "method": method_label(ckpt),
            "bits_per_weight": linear_bits_per_weight(ckpt, files),
            "size_bytes": sum((ckpt.dir / f).stat().st_size for f in files)}


def gguf_info(path) -> dict:
    """model_info of a .gguf: the method of its quantkit.recipe (else the ggml types of its decoder linears, e.g.
    'Q4_K + Q6_K' for llama.cpp's Q4_K_M), bits per weight of its decoder linears' blocks, the file's size."""
    recipe, types = gguf_recipe(path), gguf_tensor_types(path)
    linears = {name: t for name, t in types.items() if linear_of(name) is not None}
    kinds = sorted({t[0] for t in linears.values()}, key=[t[0] for t in linears.values()].count, reverse=True)
    method = " + ".join(config_label(c) for c in recipe.configs()) if recipe is not None else " + ".join(kinds)
    n_weights = sum(torch.Size(shape).numel() for name, shape in checkpoint_shapes(gguf_config(path)).items()
                    if linear_of(name) is not None)
    return {"name": Path(path).name, "path": str(path), "method": f"{method} (GGUF {'/'.join(kinds)})",
            "bits_per_weight": bits_per_weight(sum(t[1] for t in linears.values()), n_weights),
            "size_bytes": Path(path).stat().st_size}


def method_label(ckpt: QuantizedCheckpoint) -> str:
    recipe = ckpt.recipe()
    if recipe is not None:
        return " + ".join(config_label(c) for c in recipe.configs())
    if ckpt.quantization_config:
        q = ckpt.quantization_config
        bits = q.get("bits") or q.get("config_groups", {}).get("group_0", {}).get("weights", {}).get("num_bits")
        return " ".join(str(x) for x in (q.get("quant_method"), bits and f"w{bits}") if x)
    return short_name(ckpt.default_dtype())  # fp16, ...


def config_label(config) -> str:
    """A short name for a method's config: 'int4 g128', 'rtn w3 g128 sym', 'gptq w4 g128 act-order', 'bnb-nf4'."""
    parts = [f"awq+{config.method}" if getattr(config, "awq", False) else config.method]  # gptq --awq
    if hasattr(config, "bits") and config.method != "int4":
        parts.append(f"w{config.bits}")
    if hasattr(config, "group_size"):
        parts.append("per-channel" if config.group_size == PER_CHANNEL else f"g{config.group_size}")
    if getattr(config, "symmetric", False):
        parts.append("sym")
    if getattr(config, "desc_act", False):
        parts.append("act-order")
    return " ".join(parts)


def linear_bits_per_weight(ckpt: QuantizedCheckpoint, files: list[str]) -> float | None:
    """quant.record.bits_per_weight from the file headers; None for .bin checkpoints."""
    if not all(f.endswith(".safetensors") for f in files):
        return None
    n_bytes = 0
    for file_name in files:
        with safe_open(ckpt.dir / file_name, framework="pt") as f:
            for name in f.keys():
                if linear_of(name) is not None:
                    s = f.get_slice(name)
                    n_bytes += torch.Size(s.get_shape()).numel() * ST_ITEMSIZE[s.get_dtype()]
    n_weights = sum(torch.Size(shape).numel() for name, shape in checkpoint_shapes(ckpt.config).items()
                    if name.endswith(".weight") and linear_of(name) is not None)
    return bits_per_weight(n_bytes, n_weights)


def layer_errors(path: str | os.PathLike) -> list[dict]:
    """Per-linear errors recorded by `quantkit quantize` in the output directory (empty if none, and for a .gguf)."""
    if is_gguf(path):
        return []
    rows = open_checkpoint(path).errors().values()
    return [dict(row, layer=layer_index(row["name"])) for row in rows if row.get("relative_error") is not None]


@torch.no_grad()
def decode_tokens_per_s(model, tokenizer, new_tokens: int = 32, prompt: str = "The") -> float:
    """Greedy batch-1 decode speed with the KV cache, after a short warm-up (kernels build on first use)."""
    ids = [tokenizer.encode(prompt)]
    if callable(getattr(model, "decode_tokens_per_s", None)):  # another runtime's model (eval.llamacpp)
        speed = model.decode_tokens_per_s(ids[0], new_tokens)
        check_numbers({"tokens_per_s": speed}, model_label(model), "decode")
        return speed
    with int4_kernels(model):  # the kernel people decode with, also where measurements compute exactly (fp32)
        generate(model, ids, SamplingConfig(max_new_tokens=4))
        start = time.perf_counter()
        out = generate(model, ids, SamplingConfig(max_new_tokens=new_tokens))
        seconds = time.perf_counter() - start
    speed = len(out[0]) / seconds if seconds > 0 else math.inf
    check_numbers({"tokens_per_s": speed}, model_label(model), "decode")
    return speed


def model_entry(info: dict, result: EvalResult, tokens_per_s: float | None = None,
                errors: list[dict] | None = None, sensitivity: dict | None = None) -> dict:
    """A model's entry of the report (see eval/report.schema.json); every metric in it is finite (or an error)."""
    entry = {**info, "tokens_per_s": tokens_per_s, "perplexity": result.perplexity.report(),
             "fidelity": result.fidelity, "layer_errors": errors or [], "sensitivity": sensitivity}
    for key in ("tokens_per_s", "perplexity", "fidelity", "sensitivity"):
        check_numbers(entry[key], info.get("path", "the model"), key)
    return entry


def build_report(data: EvalData, models: list[dict], base: dict | None = None, tp: dict | None = None,
                 command: str | None = None) -> dict:
    import datetime

    return {"schema": "quantkit-eval-report", "schema_version": 1, "quantkit_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": command, "dataset": data.describe(), "base": base, "models": models, "tp": tp}
