"""Llama 2 configuration, read from and written to Hugging Face config.json.

Both dialects are understood: transformers 4.x (`rope_theta`, `rope_scaling`, `torch_dtype`; the
real Llama 2 checkpoints) and transformers 5.x (`rope_parameters`, `dtype`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantkit.errors import QuantkitError

ROPE_TYPES = ("default", "linear", "dynamic")


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None -> MHA (= num_attention_heads)
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_type: str = "default"  # default | linear | dynamic
    rope_factor: float = 1.0
    tie_word_embeddings: bool = False
    pretraining_tp: int = 1
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int | None = None
    torch_dtype: str = "float16"
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # other keys, kept for saving

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise QuantkitError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}: fix config.json"
            )
        if self.rope_type not in ROPE_TYPES:
            raise QuantkitError(
                f"rope scaling type {self.rope_type!r} is not supported: use one of {', '.join(ROPE_TYPES)}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "head_dim"):
            if getattr(self, name) <= 0:
                raise QuantkitError(f"{name}={getattr(self, name)} must be positive: fix config.json")

    @property
    def n_rep(self) -> int:
        """Query heads per key/value head (8 for Llama-2-70B's GQA)."""
        return self.num_attention_heads // self.num_key_value_heads

    # -- Hugging Face config.json -------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "LlamaConfig":
        model_type = d.get("model_type")
        if model_type != "llama":
            raise QuantkitError(
                f"{source}: model_type is {model_type!r}, not 'llama': quantkit reads Llama 2 checkpoints only"
            )
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "rope_type", "rope_factor", "torch_dtype"}
        kwargs = {k: d[k] for k in known if k in d and d[k] is not None}
        # transformers 5 nests rope_theta and scaling in rope_parameters; 4.x uses rope_theta + rope_scaling.
        rope = dict(d.get("rope_parameters") or {})
        rope.update(d.get("rope_scaling") or {})
        if "rope_theta" in rope:
            kwargs["rope_theta"] = rope["rope_theta"]
        kwargs["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
        kwargs["rope_factor"] = float(rope.get("factor", 1.0))
        kwargs["torch_dtype"] = d.get("dtype") or d.get("torch_dtype") or "float16"
        for key in ("eos_token_id", "bos_token_id"):
            if isinstance(kwargs.get(key), list):  # some configs list several EOS ids
                kwargs[key] = kwargs[key][0]
        consumed = known | {"rope_parameters", "rope_scaling", "rope_theta", "dtype", "torch_dtype"}
        extra = {k: v for k, v in d.items() if k not in consumed}
        try:
            return cls(**kwargs, extra=extra)
        except TypeError as e:
            raise QuantkitError(f"{source}: {e}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "LlamaConfig":
        path = Path(path)
        if not path.is_file():
            raise QuantkitError(f"{path}: no config.json: a model directory needs the Hugging Face config.json")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise QuantkitError(f"{path}: not valid JSON ({e}): restore the file") from None
        if not isinstance(d, dict):
            raise QuantkitError(f"{path}: expected a JSON object")
        return cls.from_hf_dict(d, source=str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json in transformers 5's dialect (which transformers 4.x also reads)."""
        d = dict(self.extra)
        d.update(
            {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in ("extra", "rope_type", "rope_factor", "rope_theta", "torch_dtype")}
        )
        rope = {"rope_theta": self.rope_theta, "rope_type": self.rope_type}
        if self.rope_type != "default":
            rope["factor"] = self.rope_factor
        d.update(model_type="llama", architectures=["LlamaForCausalLM"], rope_parameters=rope,
                 dtype=self.torch_dtype, hidden_act="silu")
        return dict(sorted(d.items()))


# The real shapes of Meta's Llama 2 checkpoints (Hugging Face conversions).
PRESETS: dict[str, LlamaConfig] = {
    "llama2-7b": LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=32),
    "llama2-13b": LlamaConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                              num_attention_heads=40, num_key_value_heads=40),
    "llama2-70b": LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                              num_attention_heads=64, num_key_value_heads=8),
}


def preset(name: str) -> LlamaConfig:
    if name not in PRESETS:
        raise QuantkitError(f"unknown preset {name!r}: use one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])
