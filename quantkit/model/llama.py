"""A compact Llama 2 in PyTorch, numerically matching transformers' LlamaForCausalLM.

Module and parameter names follow Hugging Face's (`model.layers.3.self_attn.q_proj.weight`), so a
state dict moves between the two unchanged and quantized modules keep the names exporters need.
Shapes: B batch, T new tokens, S keys (cached + new), H query heads, KV key/value heads, D head_dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.model.config import LlamaConfig
from quantkit.model.layout import DECODER_LINEARS, layer_prefix, parse


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 and cast back before the scale, exactly as transformers does.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_inv_freq(config: LlamaConfig, seq_len: torch.Tensor, device) -> torch.Tensor:
    """Inverse rotary frequencies (D/2,), with Llama's linear or dynamic-NTK scaling."""
    dim, base = config.head_dim, config.rope_theta
    if config.rope_type == "dynamic":
        # Dynamic NTK (transformers' _compute_dynamic_ntk_parameters): grow the base once the
        # sequence outruns max_position_embeddings. Tensor arithmetic keeps transformers' fp32 rounding.
        max_pos = config.max_position_embeddings
        seq_len = torch.clamp(seq_len, min=max_pos)
        factor = config.rope_factor
        base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    if config.rope_type == "linear":
        inv_freq = inv_freq / config.rope_factor
    return inv_freq


def rotary_embedding(config: LlamaConfig, positions: torch.Tensor, dtype):
    """cos, sin (B, 1, T, D) for integer positions (B, T), computed in fp32 as transformers does."""
    inv_freq = rope_inv_freq(config, positions.max() + 1, positions.device)
    freqs = positions.float()[..., None] * inv_freq  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    # x: (B, H, T, D); cos, sin: (B, 1, T, D). Half-split rotation: HF checkpoints permute q/k rows for it.
    return x * cos + rotate_half(x) * sin




def linear_split_rows(x, linear: nn.Module, tp: int):
    """transformers 4.x pretraining_tp for q/k/v, gate/up and lm_head: slice output rows, concatenate."""
    if tp == 1:
        return linear(x)
    if type(linear) is nn.Linear:  # weight views, as 4.x did (bnb's modules subclass nn.Linear: not them)
        y = torch.cat([F.linear(x, w) for w in linear.weight.chunk(tp, dim=0)], dim=-1)
    else:
        y = torch.cat([part(x) for part in linear_parts(linear, tp, 0)], dim=-1)
    return add_bias(y, linear)


def linear_split_cols(x, linear: nn.Module, tp: int):
    """transformers 4.x pretraining_tp for o_proj and down_proj: slice input columns, sum partial products.

    The partial products are added in order, as `sum()` did there: this changes the rounding, which is
    the point of comparing tp settings.
    """
    if tp == 1:
        return linear(x)
    if type(linear) is nn.Linear:
        parts = [F.linear(xi, wi) for xi, wi in zip(x.chunk(tp, dim=-1), linear.weight.chunk(tp, dim=1))]
    else:
        parts = [part(xi) for xi, part in zip(x.chunk(tp, dim=-1), linear_parts(linear, tp, 1))]
    return add_bias(sum(parts), linear)


def add_bias(y, linear: nn.Module):
    """The bias once, after combining the slices (the parts carry none)."""
    bias = getattr(linear, "bias", None)
    return y if bias is None else y + bias.to(y.dtype)


def linear_parts(linear: nn.Module, tp: int, dim: int) -> list[nn.Module]:
    """`linear.split(tp, dim)`, built once per (tp, dim) and kept in `linear.__dict__`.

    Not registered as submodules: state_dict, named_modules, exporters and `.to()` never see them. So a
    stamp of the module's own tensors (device, dtype, storage, in-place version) and kernel choice is kept
    with them, and they are rebuilt when it changes (after `.to()`, `load_state_dict`, ...).
    """
    if not callable(getattr(linear, "split", None)):
        raise QuantkitError(unsliceable("this module", linear, tp))
    cache = linear.__dict__.setdefault("_tp_parts", {})  # (tp, dim) -> (stamp, parts)
    stamp = _state_stamp(linear)
    if (tp, dim) not in cache or cache[(tp, dim)][0] != stamp:
        cache[(tp, dim)] = (stamp, linear.split(tp, dim))
    return cache[(tp, dim)][1]


def _state_stamp(linear: nn.Module) -> tuple:
    """What the parts were built from: each own tensor's device, dtype, storage and in-place version."""
    tensors = [t for t in (*linear._parameters.values(), *linear._buffers.values()) if t is not None]
    stamp = tuple((t.device, t.dtype, t.data_ptr(), None if t.is_inference() else t._version) for t in tensors)
    return stamp + (getattr(linear, "use_int4_kernel", None),)  # AffineLinear's parts follow its kernel choice


def drop_linear_parts(linear: nn.Module, keep_tp: int | None = None):
    """Forget cached parts, except those for `keep_tp` (one tp's parts in memory at a time)."""
    cache = linear.__dict__.get("_tp_parts", {})
    for key in [k for k in cache if k[0] != keep_tp]:
        del cache[key]


def unsliceable(name: str, linear: nn.Module, tp: int) -> str:
    """The one-line error for a linear that pretraining_tp cannot slice (bitsandbytes, unknown modules)."""
    config = getattr(getattr(linear, "quant_record", None), "config", None)  # quantkit.quant.record, read duck-typed
    kind = type(linear).__name__ + (f" ({config.method})" if getattr(config, "method", "") else "")
    return (f"pretraining_tp={tp}: {name} is a {kind}, which cannot be sliced (it has no split(tp, dim)): "
            f"use pretraining_tp=1, or a dense or integer-affine (int4/rtn/gptq) model")


def slicing_problem(name: str, linear: nn.Module, tp: int) -> str | None:
    """Why pretraining_tp=tp cannot slice the module `name` (a decoder linear or lm_head), or None if it can.

    Decided without building the parts where the module says so itself (AffineLinear's _split_problem);
    another module with a split() is tried once (its parts are dropped at once).
    """
    dim = DECODER_LINEARS.get(parse(name)[1], 0)  # lm_head: rows
    if tp == 1 or type(linear) is nn.Linear:
        return None
    if not callable(getattr(linear, "split", None)):
        return unsliceable(name, linear, tp)
    problem = getattr(linear, "_split_problem", None)
    if callable(problem):
        reason = problem(tp, dim)
        return None if reason is None else f"pretraining_tp={tp}: {name}: {reason}"
    try:
        linear.split(tp, dim)
    except QuantkitError as e:
        return f"pretraining_tp={tp}: {name}: {e}"
    return None


def indivisible_dims(config: LlamaConfig, tp: int) -> list[str]:
    """The dimensions ('hidden_size=4096', ...) that pretraining_tp=tp does not divide."""
    c = config
    dims = {"q_proj rows": c.num_attention_heads * c.head_dim, "k/v_proj rows": c.num_key_value_heads * c.head_dim,
            "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size, "vocab_size": c.vocab_size}
    return [f"{k}={v}" for k, v in dims.items() if tp < 1 or v % tp]


class KVCache:
    """Preallocated keys and values for generation: per layer (B, KV, max_len, D).

    `key_mask` (B, max_len) marks cached slots holding real tokens (left padding is False);
    `next_position` (B,) is each row's next rotary position.
    """

    def __init__(self, config: LlamaConfig, batch_size: int, max_len: int, dtype, device):
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.key_mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.length = 0
        self.max_len = max_len

    def update(self, layer: int, k, v):
        """Store k, v (B, KV, T, D) after the cached ones; return all keys and values so far."""
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        self.pretraining_tp = config.pretraining_tp
        bias, hidden = config.attention_bias, config.hidden_size
        self.q_proj = nn.Linear(hidden, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, hidden, bias=bias)

    def forward(self, x, cos, sin, mask, cache: KVCache | None):
        return self.output(self.attend(x, cos, sin, mask, cache))

    def attend(self, x, cos, sin, mask, cache: KVCache | None):
        """Attention up to o_proj: x (B, T, hidden) -> o_proj's input (B, T, heads * head_dim)."""
        B, T, _ = x.shape
        tp = self.pretraining_tp
        q = linear_split_rows(x, self.q_proj, tp).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = linear_split_rows(x, self.k_proj, tp).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = linear_split_rows(x, self.v_proj, tp).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # (B, H, T, D), (B, KV, T, D)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, KV, S, D)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, enable_gqa=self.n_heads != self.n_kv_heads)
        return y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)

    def output(self, y):
        """o_proj of attend's output."""
        return linear_split_cols(y, self.o_proj, self.pretraining_tp)


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.pretraining_tp = config.pretraining_tp
        hidden, inter, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(hidden, inter, bias=bias)
        self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)

    def forward(self, x):
        return self.down(self.down_input(x))

    def down(self, d):
        """down_proj of its input d (B, T, intermediate), sliced as pretraining_tp says: the MLP's output."""
        return linear_split_cols(d, self.down_proj, self.pretraining_tp)

    def down_input(self, x):
        """act(gate_proj(x)) * up_proj(x): down_proj's input (B, T, intermediate)."""
        tp = self.pretraining_tp
        return F.silu(linear_split_rows(x, self.gate_proj, tp)) * linear_split_rows(x, self.up_proj, tp)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask=None, cache: KVCache | None = None):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """`model(input_ids)` -> logits (B, T, vocab). Pass `attention_mask` (B, T) for left-padded
    batches and a `KVCache` from `new_cache` to generate incrementally."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self.set_pretraining_tp(config.pretraining_tp)

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def set_pretraining_tp(self, tp: int):
        """Switch transformers 4.x's sliced computation on (tp > 1) or off (tp = 1), no reload needed.

        Quantized linears are sliced through their `split(tp, dim)`; the parts are built here, so a
        module that cannot be sliced is an error now (naming it), and the model's tp is left unchanged.
        """
        bad = indivisible_dims(self.config, tp)
        if tp < 1 or bad:
            raise QuantkitError(f"pretraining_tp={tp} does not divide {', '.join(bad) or 'anything'}: "
                                f"choose a positive divisor of every dimension")
        if tp > 1:
            self._build_tp_parts(tp)
        for _, linear, _ in self.tp_linears():
            drop_linear_parts(linear, keep_tp=tp)
        for layer in self.model.layers:
            layer.self_attn.pretraining_tp = layer.mlp.pretraining_tp = tp
        self.pretraining_tp = tp

    def tp_linears(self):
        """(name, module, dim) of every linear pretraining_tp slices: dim 0 by rows, dim 1 by columns."""
        for i, layer in enumerate(self.model.layers):
            for name, dim in DECODER_LINEARS.items():  # pretraining_tp slices rows (0) or columns (1)
                yield layer_prefix(i) + name, layer.get_submodule(name), dim
        yield "lm_head", self.lm_head, 0

    def _build_tp_parts(self, tp: int):
        """Every non-nn.Linear's parts for tp, or a QuantkitError naming the first module that cannot be split."""
        quantized = [(n, m, d) for n, m, d in self.tp_linears() if type(m) is not nn.Linear]
        for name, linear, _ in quantized:  # up front, before building anything
            if not callable(getattr(linear, "split", None)):
                raise QuantkitError(unsliceable(name, linear, tp))
        for name, linear, dim in quantized:
            try:
                linear_parts(linear, tp, dim)
            except QuantkitError as e:
                for _, built, _ in quantized:  # keep the current tp's parts only
                    drop_linear_parts(built, keep_tp=getattr(self, "pretraining_tp", 1))
                raise QuantkitError(f"pretraining_tp={tp}: {name}: {e}") from e

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.config, batch_size, max_len, p.dtype, p.device)

    def rotary(self, positions: torch.Tensor, dtype):
        return rotary_embedding(self.config, positions, dtype)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        if cache is not None and start + T > cache.max_len:
            raise QuantkitError(f"KV cache holds {cache.max_len} tokens, {start + T} needed: make a larger cache")
        valid = (torch.ones(B, T, dtype=torch.bool, device=input_ids.device) if attention_mask is None
                 else attention_mask.bool())
        past_positions = cache.next_position[:, None] if cache is not None else 0  # (B, 1)
        # Left padding: the first real token of each row gets position 0 (as transformers' generate does).
        positions = past_positions + (valid.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
        mask = self._attention_mask(valid, start, cache)
        x = self.model.embed_tokens(input_ids)  # (B, T, hidden)
        cos, sin = self.rotary(positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.key_mask[:, start:start + T] = valid
            cache.next_position += valid.sum(-1)
            cache.length += T
        x = self.model.norm(x)
        return linear_split_rows(x, self.lm_head, self.pretraining_tp)

    @staticmethod
    def _attention_mask(valid, start: int, cache: KVCache | None):
        """Boolean (B, 1, T, S) mask, or None where SDPA's own causal mask (or no mask) is exact."""
        B, T = valid.shape
        past_valid = cache.key_mask[:, :start] if cache is not None else valid[:, :0]
        if bool(valid.all()) and bool(past_valid.all()) and (start == 0 or T == 1):
            return None
        key_valid = torch.cat([past_valid, valid], dim=1)  # (B, S)
        q_pos = torch.arange(T, device=valid.device)[:, None] + start
        k_pos = torch.arange(start + T, device=valid.device)[None, :]
        mask = (k_pos <= q_pos)[None] & key_valid[:, None, :]  # (B, T, S)
        mask |= k_pos == q_pos  # a padding query attends to itself: no empty rows, no NaN
        return mask[:, None]
