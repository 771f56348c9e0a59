"""The Llama module grammar, the one home for it: names, shapes and groupings of a decoder layer.

Hugging Face names every tensor `model.layers.{i}.{local}` inside the decoder layers (`local` such as
`self_attn.q_proj.weight`) and `model.embed_tokens`, `model.norm`, `lm_head` outside them. Everything
that needs to know which linears a layer has, in which order GPTQ quantizes them, how pretraining_tp
slices them, which ones vLLM fuses, or which layer a name belongs to asks this module.
"""

from __future__ import annotations

import re

LAYERS = "model.layers"

# The seven linears of a decoder layer, in forward order, with the dimension pretraining_tp slices:
# output rows (0: q/k/v, gate/up; outputs concatenated) or input columns (1: o, down; partial sums).
DECODER_LINEARS: dict[str, int] = {"self_attn.q_proj": 0, "self_attn.k_proj": 0, "self_attn.v_proj": 0,
                                   "self_attn.o_proj": 1, "mlp.gate_proj": 0, "mlp.up_proj": 0,
                                   "mlp.down_proj": 1}
ATTENTION_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP_LINEARS = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")

# True-sequential groups (GPTQ's llama.py): each group shares its inputs, and each is calibrated on
# inputs recomputed through the groups quantized before it.
SEQUENTIAL_GROUPS: tuple[tuple[str, ...], ...] = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                                                  ("self_attn.o_proj",), ("mlp.gate_proj", "mlp.up_proj"),
                                                  ("mlp.down_proj",))


def group_of(name: str) -> tuple[str, ...]:
    """The true-sequential group (of SEQUENTIAL_GROUPS) a decoder linear ('mlp.up_proj') is in: the linears that
    read its input. ValueError for a name in none."""
    for group in SEQUENTIAL_GROUPS:
        if name in group:
            return group
    raise ValueError(f"{name}: not a decoder linear of SEQUENTIAL_GROUPS")

# Activation-aware scaling (AWQ, Lin et al. 2023, arXiv:2306.00978; llm-compressor's Llama mappings): a module
# whose output channels absorb 1/s, the linears after it whose input channels take s (the float layer unchanged),
# and the block whose output judges a scaling. v_proj -> o_proj needs one o_proj input column per v_proj output
# channel, which GQA (fewer kv heads) does not give.
SCALING_PAIRS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    ("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    ("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"))

# Shards that vLLM fuses into one linear (qkv_proj, gate_up_proj): each fused set needs one scheme.
FUSED_SHARDS: tuple[tuple[str, ...], ...] = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                                             ("mlp.gate_proj", "mlp.up_proj"))

# Modules outside the decoder linears that a recipe might name but quantkit never quantizes (they stay in the
# export dtype in every format it writes), with the reason a rule naming them is refused.
NOT_QUANTIZED: dict[str, str] = {
    "model.embed_tokens": "the embedding is a lookup table, not a matmul: it stays in the export dtype",
    "lm_head": "quantkit does not quantize the lm_head yet (every format it writes keeps it in the export dtype)",
}

_NAME = re.compile(r"^(?P<head>.*?)(?:^|\.)layers\.(?P<layer>\d+)(?:\.(?P<local>.+))?$")
_LINEAR = "|".join(re.escape(n) for n in DECODER_LINEARS)
_DECODER_LINEAR = re.compile(rf"(?:^|\.)layers\.\d+\.(?:{_LINEAR})$")


def layer_prefix(index: int) -> str:
    """'model.layers.3.': the prefix of every tensor and module name of decoder layer `index`."""
    return f"{LAYERS}.{index}."


def parse(name: str) -> tuple[int | None, str]:
    """(layer index, name inside the layer) of a module or tensor name; (None, name) outside the layers.

    'model.layers.3.mlp.down_proj.weight' -> (3, 'mlp.down_proj.weight'); 'lm_head' -> (None, 'lm_head').
    Names with another root (a bare layer's 'layers.3.mlp.up_proj') parse the same way.
    """
    m = _NAME.match(name)
    if m is None:
        return None, name
    return int(m.group("layer")), m.group("local") or ""


def layer_index(name: str) -> int | None:
    """The decoder layer a name belongs to, or None outside the layers."""
    return parse(name)[0]


def local_name(name: str) -> str:
    """The name inside its decoder layer: 'model.layers.3.self_attn.q_proj' -> 'self_attn.q_proj'."""
    return parse(name)[1]


def block_of(name: str) -> str | None:
    """'model.layers.3' for any name inside decoder layer 3; None outside the layers."""
    index, local = parse(name)
    return None if index is None else name[: len(name) - len(local)].rstrip(".")


def is_decoder_linear(name: str) -> bool:
    """Whether a module name is one of the seven decoder linears of some layer."""
    return _DECODER_LINEAR.search(name) is not None


def linear_of(tensor_name: str) -> str | None:
    """The decoder linear a tensor belongs to ('model.layers.3.mlp.up_proj.qweight' -> 'model.layers.3.mlp.up_proj')."""
    index, local = parse(tensor_name)
    if index is None:
        return None
    for linear in DECODER_LINEARS:
        if local.startswith(linear + "."):
            return tensor_name[: len(tensor_name) - len(local)] + linear
    return None


def layer_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every tensor of one decoder layer (local names) with the shape a LlamaConfig implies."""
    c = config
    q, kv, h, i = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.hidden_size, \
        c.intermediate_size
    out_in = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, q), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
    shapes = {f"{name}.weight": shape for name, shape in out_in.items()}
    shapes.update({f"{norm}.weight": (h,) for norm in LAYER_NORMS})
    for names, has_bias in ((ATTENTION_LINEARS, c.attention_bias), (MLP_LINEARS, c.mlp_bias)):
        if has_bias:
            shapes.update({f"{name}.bias": (out_in[name][0],) for name in names})
    return shapes


def checkpoint_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every tensor name of a Llama checkpoint with its shape, in Hugging Face's naming and model order."""
    c = config
    shapes = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size), "model.norm.weight": (c.hidden_size,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    layer = layer_shapes(config)
    for index in range(c.num_hidden_layers):
        shapes.update({layer_prefix(index) + k: v for k, v in layer.items()})
    return shapes


def module_names(config) -> tuple[list[str], list[str]]:
    """(every decoder linear, every other module) of a Llama model with this config: full names, model order."""
    linears = [layer_prefix(i) + name for i in range(config.num_hidden_layers) for name in DECODER_LINEARS]
    norms = [layer_prefix(i) + norm for i in range(config.num_hidden_layers) for norm in LAYER_NORMS]
    return linears, ["model.embed_tokens", *norms, "model.norm", "lm_head"]
