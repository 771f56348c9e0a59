"""`awq`: activation-aware weight quantization (Lin et al. 2023, arXiv:2306.00978), calibrated layer by layer.

Once per decoder layer, before any of it is quantized (the calibrator's layer transform, quantkit/run/calibrator.py),
for each scaling pair of quantkit.model.layout.SCALING_PAIRS (input_layernorm -> q/k/v judged on the attention's
output, v_proj -> o_proj on o_proj's, post_attention_layernorm -> gate/up on the MLP's, up_proj -> down_proj on
down_proj's; v_proj -> o_proj only where the shapes pair, not under GQA):

  1. x_mean: the mean |x| of each input channel of the pair's linears over all calibration tokens; with duo scaling
     also w_mean, the mean over output rows of |W| / max|W| in its quantization group (the linears stacked);
  2. a grid search of the exponent a in 0, 1/n_grid, ..., (n_grid-1)/n_grid: s = x_mean^a (duo: x_mean^a /
     (w_mean^(1-a) + 1e-4)), clamped at 1e-4 and normalised by sqrt(max s * min s); the pair's linears
     fake-quantized as Q(W diag(s)) diag(s)^-1; the judged block's mean squared output error against the float
     block on about `search_tokens` tokens spread over the calibration set (every k-th token; for the attention,
     the first 512 tokens of every k-th window) (for o_proj and down_proj, blocks that are one linear, from those tokens' mean x x^T
     where that is cheaper: linear_error); s = 1 (no scaling) is a candidate too, so the chosen s is never worse
     than none on this objective;
  3. the best s folded into the pair (quantkit.quant.scaling.fold_scales): the float layer is unchanged to rounding.

Then (`clip`) each linear but q_proj and k_proj (whose errors the attention's q k^T product mixes) gets AWQ's
clipping search: per output row and quantization group, the range max|w| * (1 - i/20), i = 0..9, whose
fake-quantized group gives the smallest squared error of that group's partial output x_g . w_g over `clip_tokens`
evenly spaced calibration tokens; the weights are clamped to it (i = 0 is no clipping: never worse on that error).

Each linear is then rounded to nearest on its scaled weight (torchao's qparams, as `rtn`). The search follows
AutoAWQ's quantizer.py (`_search_best_scale`, `_compute_best_scale`) and llm-compressor's AWQModifier.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from quantkit.backends.registry import QuantConfig, register_backend
from quantkit.errors import QuantkitError
from quantkit.model.layout import SCALING_PAIRS, SEQUENTIAL_GROUPS, group_of
from quantkit.backends.rtn import quantize_rtn
from quantkit.quant.affine import quantize_weight, resolve_group_size, validate_affine
from quantkit.quant.scaling import fold_scales

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AWQConfig(QuantConfig):
    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    duo_scaling: bool = True  # s from activation and weight magnitudes (AutoAWQ's and llm-compressor's default)
    n_grid: int = 20  # exponents searched: 0, 1/n_grid, ..., (n_grid - 1)/n_grid
    search_tokens: int = 2048  # tokens, spread over the set, the search judges on (bench/RESULTS.md: KL flat from 2048)
    clip: bool = True  # then search each group's clipping range (AutoAWQ's auto_clip; not q_proj, k_proj)
    clip_tokens: int = 512  # tokens, evenly spaced, the clipping search measures on (AutoAWQ's n_sample_token)

    def __post_init__(self):
        validate_affine("awq", self.bits, self.group_size)
        if self.n_grid < 1:
            raise QuantkitError(f"awq: n_grid {self.n_grid} must be at least 1")
        if self.search_tokens < 1 or self.clip_tokens < 1:
            raise QuantkitError(f"awq: search_tokens ({self.search_tokens}) and clip_tokens ({self.clip_tokens}) "
                                f"must be positive")


def fake_quantize(w: torch.Tensor, config: AWQConfig, name: str) -> torch.Tensor:
    """Q(w) in w's dtype: rounded to nearest on config's grid (the handler's arithmetic)."""
    return quantize_weight(w, config.bits, config.group_size, config.symmetric, name=name).dequantize(w.dtype)


def weight_magnitude(linears: list[nn.Linear], group_size: int) -> torch.Tensor:
    """w_mean (K,): per input channel, the mean over the linears' stacked rows of |W| / max|W| of its group."""
    w = torch.cat([linear.weight.float() for linear in linears])  # (sum N, K)
    g = resolve_group_size(group_size, w.shape[1], "awq")
    grouped = w.abs().reshape(w.shape[0], -1, g)
    return (grouped / (grouped.amax(-1, keepdim=True) + 1e-6)).reshape(w.shape).mean(0)


def candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor | None, ratio: float) -> torch.Tensor:
    """s (K,) for exponent `ratio`, normalised so that max s * min s = 1; non-finite entries set to 1."""
    if w_mean is None:
        s = x_mean.pow(ratio).clamp(min=1e-4)
    else:
        s = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    return torch.where(torch.isfinite(s), s, torch.ones_like(s))


SEARCH_CHUNK = 4096  # tokens a block evaluation of the search computes at once
SEARCH_WINDOW = 512  # the attention is judged on window prefixes this long (AutoAWQ's max_calib_seq_len)


@dataclass
class PairInputs:
    """What AWQ needs of one true-sequential group's inputs, from one streamed pass (input_statistics)."""

    x_mean: torch.Tensor  # (K,): each input channel's mean |x| over all tokens
    searched: list[torch.Tensor]  # about search_tokens tokens over the whole set, in chunks: what the search judges
    spaced: torch.Tensor  # (about clip_tokens, K): every (total // clip_tokens)-th token (the clipping search's)


def every(t: torch.Tensor, offset: int, stride: int) -> torch.Tensor:
    """The rows of t (a copy) whose index counted from `offset` is a multiple of stride."""
    return t[(-offset) % stride:: stride].clone()


@torch.no_grad()
def input_statistics(inputs: Iterable[torch.Tensor], search_tokens: int, windows: bool = False, clip_tokens: int = 1,
                     total: int = 1) -> PairInputs:
    """PairInputs from a group's input batches (b, T, K), streamed once; `total`: the tokens in all of them.

    The searched tokens are spread over the whole calibration set, not its first windows: with `windows` (a block
    whose outputs depend on a window's earlier tokens: the attention) the first SEARCH_WINDOW tokens of every k-th
    window (causal: their outputs are the whole window's), about search_tokens tokens (at least one prefix); else
    every (total // search_tokens)-th token; in chunks of about SEARCH_CHUNK tokens."""
    count, x_sum, picked, spaced, L = 0, 0, [], [], 1
    for x in inputs:
        T, K = x.shape[1], x.shape[-1]
        L = min(T, SEARCH_WINDOW)
        flat = x.reshape(-1, K)
        x_sum = x_sum + flat.abs().sum(0, dtype=torch.float32)
        spaced.append(every(flat, count, max(1, total // clip_tokens)))
        if search_tokens > 0 and windows:
            picked.append(every(x[:, :L], count // T, max(1, (total // T) // max(1, search_tokens // L))))
        elif search_tokens > 0:
            picked.append(every(flat, count, max(1, total // search_tokens)))
        count += flat.shape[0]
    searched = list(torch.cat(picked).split(max(1, SEARCH_CHUNK // L) if windows else SEARCH_CHUNK)) if picked else []
    return PairInputs(x_sum / count, searched, torch.cat(spaced))


@torch.no_grad()
def block_error(block: Callable[[torch.Tensor], torch.Tensor], searched: list[torch.Tensor]) -> Callable[[], float]:
    """The mean squared error of `block`'s outputs on the searched batches, as its linears are at the call, against
    its outputs now (AutoAWQ's and llm-compressor's loss)."""
    reference = [block(x) for x in searched]
    count = sum(y.numel() for y in reference)

    @torch.no_grad()
    def error() -> float:
        return sum(float((block(x).float() - y.float()).pow(2).sum()) for x, y in zip(searched, reference)) / count
    return error


@torch.no_grad()
def linear_error(linear: nn.Linear, searched: list[torch.Tensor]) -> Callable[[], float]:
    """block_error's loss for a block that is the one linear, from the inputs' second moment: ||(W' - W) x||^2
    averaged over the tokens and the N outputs is tr(D H D^T) / N, D = W' - W (N, K), H the mean x x^T (K, K) in
    fp32: T K^2 once and N K^2 a candidate instead of T N K (cheaper where K is small next to T: `second_moment_pays`)."""
    flats = [x.reshape(-1, x.shape[-1]).float() for x in searched]
    H = sum(f.T @ f for f in flats) / sum(f.shape[0] for f in flats)
    original = linear.weight.detach().float().clone()

    def error() -> float:
        d = linear.weight.detach().float() - original
        return float(((d @ H) * d).sum()) / d.shape[0]
    return error


def second_moment_pays(linear: nn.Linear, tokens: int, candidates: int) -> bool:
    """Whether linear_error costs fewer multiply-adds than block_error for the linear over `tokens` tokens."""
    n, k = linear.out_features, linear.in_features
    return tokens * k * k + candidates * n * k * k < candidates * tokens * n * k


@torch.no_grad()
def search_scale(x_mean: torch.Tensor, linears: list[nn.Linear], configs: list[AWQConfig], names: list[str],
                 error: Callable[[], float]) -> tuple[torch.Tensor, float, float]:
    """(best s (K,), its loss, the loss of s = 1): AWQ's grid search for one pair (module docstring, steps 1-2).

    x_mean: the inputs' mean |x| per channel (input_statistics); `error()`: the judged block's output error with the
    linears as they are at the call (block_error, linear_error). The linears are left as they were."""
    config = configs[0]
    w_mean = weight_magnitude(linears, config.group_size) if config.duo_scaling else None
    originals = [linear.weight.detach().clone() for linear in linears]
    candidates = [torch.ones_like(x_mean)]  # no scaling first: the search never ends worse than it
    candidates += [candidate_scales(x_mean, w_mean, step / config.n_grid) for step in range(config.n_grid)]
    losses = []
    try:
        for s in candidates:
            for linear, w, c, n in zip(linears, originals, configs, names):
                scale = s.to(w.dtype)
                linear.weight.copy_(fake_quantize(w * scale, c, n) / scale)
            losses.append(error())
    finally:
        for linear, w in zip(linears, originals):
            linear.weight.copy_(w)
    finite = [i for i, loss in enumerate(losses) if math.isfinite(loss)]
    best = min(finite, key=losses.__getitem__, default=None)
    if best is None:  # every candidate's loss was NaN or Inf
        raise QuantkitError(f"{names[0]}: AWQ's scale search found no finite loss: the layer's activations overflow "
                            f"(use --calib-dtype fp32)")
    return candidates[best], losses[best], losses[0]


CLIP_GRID, CLIP_MAX_SHRINK, CLIP_ROWS = 20, 0.5, 256  # AutoAWQ's _compute_best_clip: 10 ranges, 256 rows at a time


@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, config: AWQConfig, name: str) -> torch.Tensor:
    """Each (row, group)'s best clipping bound (N, G, 1) for the weight w (N, K) on input tokens x (T, K): AWQ's
    auto_clip (module docstring), computed CLIP_ROWS rows at a time."""
    N, K = w.shape
    g = resolve_group_size(config.group_size, K, name)
    xg = x.reshape(x.shape[0], K // g, g).to(w.dtype).transpose(0, 1)  # (G, T, g)
    bounds = []
    for rows in w.split(CLIP_ROWS):
        wg = rows.reshape(rows.shape[0], 1, K // g, g)  # (n, 1, G, g)
        original = wg.abs().amax(-1, keepdim=True)  # (n, 1, G, 1)
        reference = partial_outputs(xg, wg)  # (n, T, G)
        best, best_error = original.clone(), torch.full_like(original, math.inf)
        for i in range(int(CLIP_MAX_SHRINK * CLIP_GRID)):
            bound = original * (1 - i / CLIP_GRID)
            clipped = torch.clamp(wg, -bound, bound).reshape(rows.shape)
            q = fake_quantize(clipped, config, name).reshape(wg.shape)
            error = (partial_outputs(xg, q) - reference).pow(2).mean(1, keepdim=True).unsqueeze(-1)  # (n, 1, G, 1)
            better = error < best_error
            best_error, best = torch.where(better, error, best_error), torch.where(better, bound, best)
        bounds.append(best.reshape(rows.shape[0], K // g, 1))
    return torch.cat(bounds)


def partial_outputs(xg: torch.Tensor, wg: torch.Tensor) -> torch.Tensor:
    """x_g . w_g for every row, token and group (n, T, G), from xg (G, T, g) and wg (n, 1, G, g): one batched matmul
    over the groups (AutoAWQ's broadcast product summed, at matmul speed on a CPU)."""
    return torch.bmm(xg, wg[:, 0].permute(1, 2, 0)).permute(2, 1, 0)


def clip_weight(linear: nn.Linear, bound: torch.Tensor):
    """Clamp each (row, group) of the linear's weight to [-bound, bound] (bound: (N, G, 1)), in place."""
    w = linear.weight.data
    grouped = w.reshape(w.shape[0], bound.shape[1], -1)
    w.copy_(torch.clamp(grouped, -bound, bound).reshape(w.shape))


NOT_CLIPPED = ("self_attn.q_proj", "self_attn.k_proj")  # the attention's q k^T mixes their errors (AutoAWQ)
PAIR_OF_GROUP = {group_of(followers[0]): (preceding, followers, judged)
                 for preceding, followers, judged in SCALING_PAIRS}  # the four groups are the pairs' followers


def scaled_pair(ctx, group: tuple[str, ...]) -> tuple[str, tuple[str, ...], str] | None:
    """The scaling pair whose followers are the group, where they are all awq's here and the shapes pair."""
    preceding, followers, judged = PAIR_OF_GROUP[group]
    if not all(n in ctx.configs for n in followers):
        return None  # a linear kept in full precision, or another method's: leave the pair unscaled
    outputs, inputs = ctx.layer.get_submodule(preceding).weight.shape[0], ctx.layer.get_submodule(followers[0]).in_features
    if outputs != inputs:
        log.info("%s%s -> %s: not scaled (%d outputs, %d inputs: GQA)", ctx.prefix, preceding, followers[0], outputs,
                 inputs)
        return None
    return preceding, followers, judged


def scale_pair(ctx, pair: tuple[str, tuple[str, ...], str], stats: PairInputs) -> torch.Tensor:
    """Search the pair's s (search_scale, judged by linear_error where the block is the pair's one linear, else by
    block_error) and fold it into the layer; s."""
    preceding, followers, judged = pair
    start = time.perf_counter()
    linears = [ctx.layer.get_submodule(n) for n in followers]
    names, configs = [ctx.prefix + n for n in followers], [ctx.configs[n] for n in followers]
    if followers == (judged,):  # the judged block is the pair's one linear (o_proj, down_proj)
        tokens = sum(x.shape[:-1].numel() for x in stats.searched)
        pays = second_moment_pays(linears[0], tokens, configs[0].n_grid + 1)
        error = (linear_error if pays else block_error)(linears[0], stats.searched)
    else:
        error = block_error({"self_attn": ctx.attention, "mlp": ctx.mlp}[judged], stats.searched)
    s, loss, unscaled = search_scale(stats.x_mean, linears, configs, names, error)
    fold_scales(ctx.layer.get_submodule(preceding), linears, s, name=ctx.prefix + preceding)
    log.info("%s%s -> %s: AWQ output error %.4g (unscaled %.4g), searched in %.2f s", ctx.prefix, preceding,
             "/".join(followers), loss, unscaled, time.perf_counter() - start)
    return s


def awq_layer_transform(ctx):
    """AWQ's scaling of one decoder layer, then its clipping search (the module docstring), in one streamed pass over
    each group's inputs: every pair whose linears are all awq's here is scaled, every awq linear but q/k clipped.

    The clipping search runs after every pair is scaled (AutoAWQ's order) on tokens kept from that pass, divided by
    the group's s as the fold divides its inputs (AutoAWQ's apply_scale does the same to its cached inputs)."""
    clip_inputs = {}
    for group in SEQUENTIAL_GROUPS:
        pair = scaled_pair(ctx, group)
        clipped = [n for n in group if n in ctx.configs and ctx.configs[n].clip and n not in NOT_CLIPPED]
        if pair is None and not clipped:
            continue
        config = ctx.configs[(pair[1] if pair else clipped)[0]]
        stats = input_statistics(ctx.inputs(group), config.search_tokens if pair else 0,
                                 windows=pair is not None and pair[2] == "self_attn", clip_tokens=config.clip_tokens,
                                 total=ctx.tokens)
        if pair is not None:
            s = scale_pair(ctx, pair, stats)
            ctx.rescaled(group, s)
            stats.spaced = stats.spaced / s.to(stats.spaced)
        clip_inputs[group] = (clipped, stats.spaced)
    for clipped, x in clip_inputs.values():
        for n in clipped:
            linear = ctx.layer.get_submodule(n)
            clip_weight(linear, search_clip(linear.weight, x, ctx.configs[n], ctx.prefix + n))
    ctx.changed()


@register_backend("awq", AWQConfig, formats=("compressed-tensors", "gptq"), requires=("torchao",),
                  layer_transform=awq_layer_transform,
                  description="AWQ (Lin et al. 2023): activation-aware scales folded into the layer, then RTN")
def quantize_awq(linear: nn.Linear, config: AWQConfig, name: str) -> nn.Module:
    """Round to nearest (rtn's handler: bits, group_size, symmetric) on the weight the layer transform has scaled."""
    return quantize_rtn(linear, config, name)
