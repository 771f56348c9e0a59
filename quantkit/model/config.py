"""Llama 2 configuration, read from and written to Hugging Face config.json.

Both dialects are understood: transformers 4.x (`rope_theta`, `rope_scaling`, `torch_dtype`; the
real Llama 2 checkpoints) and transformers 5.x (`rope_parameters`, `dtype`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantkit.dtypes import ALIASES, DTYPES, dtype_name, parse_dtype
from quantkit.errors import QuantkitError

log = logging.getLogger(__name__)

ROPE_TYPES = ("default", "linear", "dynamic")
POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "max_position_embeddings", "pretraining_tp")
POSITIVE_NUMBERS = ("rms_norm_eps", "rope_theta", "rope_factor")
BOOLS = ("tie_word_embeddings", "attention_bias", "mlp_bias")
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
# Keys transformers' LlamaConfig accepts as null (it derives them or has no such token); null elsewhere is an error.
NULLABLE = frozenset({"num_key_value_heads", "head_dim", *TOKEN_IDS})
NOT_SAVED = ("extra", "stated", "rope_type", "rope_factor", "rope_theta", "torch_dtype")  # written in HF's own way
# transformers' LlamaConfig defaults (4.x and 5 agree) for the non-shape keys quantkit reads: what a config.json
# that leaves one out means, in transformers and so in quantkit. Llama 2's own values (4096, 1e-05) differ, which
# is why LlamaConfig's in-code defaults (Llama-2-7B's) are not used for config.json. Shape keys are read from the
# tensors instead (quantkit.model.checkpoint).
HF_DEFAULTS: dict[str, Any] = {"max_position_embeddings": 2048, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
                               "pretraining_tp": 1, "tie_word_embeddings": False, "attention_bias": False,
                               "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None}
ASSUMED_KEY = "quantkit_assumed_defaults"  # written config.json: the keys the source left out, with the values taken


def printable(text: str) -> str:
    """A name read from a file, as is if it prints on one line, else escaped (JSON): messages stay one line."""
    return text if text.isprintable() else json.dumps(text)


def shown(value: Any) -> str:
    """A config value as config.json spells it (null, true, "text"), cut short for a one-line message."""
    text = json.dumps(value, default=repr)
    return text if len(text) <= 40 else text[:37] + "..."


def check_positive_int(key: str, value: Any) -> int:
    # bool is an int subclass and 4096.0 a float: both refused, as transformers' typed config refuses them
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise QuantkitError(f"{key} is {shown(value)}: it must be a positive integer")
    return value


FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max: the model computes these in fp32 or less


def check_positive_number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise QuantkitError(f"{key} is {shown(value)}: it must be a positive number")
    if value > FLOAT32_MAX:
        raise QuantkitError(f"{key} is {shown(value)}: it must be a positive number that float32 holds "
                            f"(at most {FLOAT32_MAX:.3g})")
    if key == "rms_norm_eps" and value >= 1:  # it is added to mean(x^2): a large one flattens every activation
        raise QuantkitError(f"{key} is {shown(value)}: it must be a small positive number (Llama 2 uses 1e-05)")
    return float(value)


def check_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise QuantkitError(f"{key} is {shown(value)}: it must be true or false")
    return value


def check_token_id(key: str, value: Any) -> int | None:
    # pad may be -1 (some conversions write it for "no pad token"); bos/eos index the vocabulary
    minimum = -1 if key == "pad_token_id" else 0
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise QuantkitError(f"{key} is {shown(value)}: it must be a token id (an integer >= {max(minimum, 0)}) "
                            f"or null")
    return value


def check_dtype(key: str, value: Any) -> str | None:
    """A config.json dtype name ('float16', 'bf16', 'torch.float16') as transformers spells it; None stays None."""
    if value is None:
        return None
    if isinstance(value, str) and ALIASES.get(value, value.removeprefix("torch.")) in DTYPES:
        return dtype_name(parse_dtype(value))
    raise QuantkitError(f"{key} is {shown(value)}: it must be one of {', '.join(DTYPES)}")


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
    torch_dtype: str | None = "float16"  # None: config.json states no dtype (the checkpoint's stored one applies)
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # other keys, kept for saving
    # The fields config.json stated; None (an in-code config, a preset) means all of them. The checkpoint
    # reader infers the shapes of unstated ones from the tensors, as transformers' dtype="auto" does the dtype.
    stated: frozenset[str] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.stated is None:
            self.stated = frozenset(f.name for f in dataclasses.fields(self))
        for key in BOOLS:
            check_bool(key, getattr(self, key))
        for key in TOKEN_IDS:
            check_token_id(key, getattr(self, key))
        for key in ("num_attention_heads", "hidden_size"):
            check_positive_int(key, getattr(self, key))
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise QuantkitError(f"hidden_size={self.hidden_size} is not a multiple of num_attention_heads="
                                    f"{self.num_attention_heads}: set head_dim or fix one of them")
            self.head_dim = self.hidden_size // self.num_attention_heads
        for key in POSITIVE_INTS:
            check_positive_int(key, getattr(self, key))
        for key in POSITIVE_NUMBERS:
            setattr(self, key, check_positive_number(key, getattr(self, key)))
        self.torch_dtype = check_dtype("torch_dtype", self.torch_dtype)
        if self.num_attention_heads % self.num_key_value_heads:
            raise QuantkitError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}: fix config.json"
            )
        if self.rope_type not in ROPE_TYPES:
            raise QuantkitError(
                f"rope scaling type {shown(self.rope_type)} is not supported: use one of {', '.join(ROPE_TYPES)}"
            )

    @property
    def n_rep(self) -> int:
        """Query heads per key/value head (8 for Llama-2-70B's GQA)."""
        return self.num_attention_heads // self.num_key_value_heads

    # -- Hugging Face config.json -------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "LlamaConfig":
        """Every malformed value is one QuantkitError naming `source` and the key."""
        model_type = d.get("model_type")
        if model_type != "llama":
            raise QuantkitError(
                f"{source}: model_type is {model_type!r}, not 'llama': quantkit reads Llama 2 checkpoints only"
            )
        try:
            kwargs = _fields_from_hf(d)
        except QuantkitError as e:
            raise QuantkitError(f"{source}: {e}") from None
        stated = frozenset(kwargs) | {k for k in TOKEN_IDS if k in d}  # a null token id is stated as null
        kwargs.setdefault("torch_dtype", None)  # silent: the checkpoint's stored dtype applies
        kwargs = {**{k: v for k, v in HF_DEFAULTS.items() if k not in kwargs}, **kwargs}
        consumed = _HF_FIELDS | {"rope_parameters", "rope_scaling", "rope_theta", "dtype", "torch_dtype"}
        extra = {k: v for k, v in d.items() if k not in consumed}
        try:
            config = cls(**kwargs, extra=extra, stated=stated)
        except QuantkitError as e:
            raise QuantkitError(f"{source}: {e}") from None
        _warn_assumed(config, source)
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> "LlamaConfig":
        path = Path(path)
        if not path.is_file():
            raise QuantkitError(f"{path}: no config.json: a model directory needs the Hugging Face config.json")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise QuantkitError(f"{path}: not valid JSON ({str(e).splitlines()[0]}): restore the file") from None
        except RecursionError:  # JSON nested thousands deep
            raise QuantkitError(f"{path}: not valid JSON (nested too deep): restore the file") from None
        except OSError as e:  # unreadable: permissions, a broken disk
            raise QuantkitError(f"{path}: cannot be read ({e.strerror or type(e).__name__}): fix its "
                                f"permissions or restore it") from None
        if not isinstance(d, dict):
            raise QuantkitError(f"{path}: expected a JSON object")
        return cls.from_hf_dict(d, source=str(path))

    @property
    def assumed(self) -> dict[str, Any]:
        """The keys config.json left out and took transformers' default for (HF_DEFAULTS), with those values."""
        return {k: getattr(self, k) for k in HF_DEFAULTS if k not in self.stated}

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json in transformers 5's dialect (which transformers 4.x also reads). Every value is written,
        those the source left out too (transformers' defaults), and those are listed under ASSUMED_KEY."""
        d = dict(self.extra)
        assumed = {**(d.pop(ASSUMED_KEY, None) or {}), **self.assumed}
        if assumed:
            d[ASSUMED_KEY] = assumed
        d.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in NOT_SAVED})
        rope = {"rope_theta": self.rope_theta, "rope_type": self.rope_type}
        if self.rope_type != "default":
            rope["factor"] = self.rope_factor
        d.update(model_type="llama", architectures=["LlamaForCausalLM"], rope_parameters=rope, hidden_act="silu")
        if self.torch_dtype is not None:
            d["dtype"] = self.torch_dtype
        return dict(sorted(d.items()))


_HF_FIELDS = frozenset(f.name for f in dataclasses.fields(LlamaConfig)) - set(NOT_SAVED)


def _warn_assumed(config: LlamaConfig, source: str):
    """One warning for the defaults taken that change the logits and are not Llama 2's own values: rms_norm_eps
    (transformers 1e-06, Llama 2 1e-05) and, with dynamic rope scaling (its threshold), max_position_embeddings
    (2048, Llama 2 4096). transformers takes the same ones. rope_theta's default (10000) is Llama 2's, which
    Llama 2's original config.json files leave out: no warning for it."""
    changing = [k for k in ("rms_norm_eps", "max_position_embeddings") if k in config.assumed
                and (k != "max_position_embeddings" or config.rope_type == "dynamic")]
    if not changing:
        return
    values = ", ".join(f"{k}={config.assumed[k]}" for k in changing)
    unread = [k for k in ("max_sequence_length", "n_positions", "seq_length") if k in config.extra]
    note = f" ({', '.join(f'{k}={config.extra[k]}' for k in unread)} is not a key transformers reads)" if unread else ""
    log.warning("%s states no %s: taking transformers' default %s, as transformers does%s; the logits depend on "
                "it: add the key to config.json if the model was trained with another value", source,
                " or ".join(changing), values, note)


def _fields_from_hf(d: dict[str, Any]) -> dict[str, Any]:
    """The dataclass fields config.json states (null ones left out where transformers allows null), checked."""
    kwargs = {}
    for key in sorted(_HF_FIELDS & d.keys()):
        value = d[key]
        if value is None and key in NULLABLE:
            continue
        if key in ("eos_token_id", "bos_token_id") and isinstance(value, list):  # some configs list several EOS ids
            if not value:
                raise QuantkitError(f"{key} is []: it must be a token id or a non-empty list of them")
            for item in value:
                check_token_id(key, item)
            value = value[0]
        kwargs[key] = value  # types and ranges: checked by __post_init__, for in-code configs too
    kwargs.update(_rope_from_hf(d))
    activation = d.get("hidden_act", "silu")  # the native model computes SwiGLU with silu, Llama's only activation
    if activation != "silu":
        raise QuantkitError(f"hidden_act is {shown(activation)}: quantkit's Llama computes silu (Llama 2's "
                            f"activation); a model trained with another one is not Llama 2")
    for key in ("dtype", "torch_dtype"):  # transformers 5's name first
        if d.get(key) is not None:
            kwargs["torch_dtype"] = check_dtype(key, d[key])
            break
    return kwargs


def _rope_from_hf(d: dict[str, Any]) -> dict[str, Any]:
    """rope_theta, rope_type, rope_factor from transformers 5's rope_parameters or 4.x's rope_theta + rope_scaling."""
    out: dict[str, Any] = {}
    if "rope_theta" in d:
        out["rope_theta"] = check_positive_number("rope_theta", d["rope_theta"])
    for key in ("rope_parameters", "rope_scaling"):  # 4.x's rope_scaling wins, as before
        rope = d.get(key)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            raise QuantkitError(f"{key} is {shown(rope)}: it must be an object such as "
                                f'{{"rope_type": "linear", "factor": 2.0}} or null')
        if "rope_theta" in rope:
            out["rope_theta"] = check_positive_number(f"{key}.rope_theta", rope["rope_theta"])
        type_key = "rope_type" if "rope_type" in rope else "type"
        rope_type = rope.get(type_key, "default")
        if rope_type not in ROPE_TYPES:
            raise QuantkitError(f"{key}.{type_key} is {shown(rope_type)}: quantkit supports "
                                f"{', '.join(ROPE_TYPES)}")
        if rope_type != "default" or "factor" in rope:
            if "factor" not in rope:
                raise QuantkitError(f"{key}.factor is missing: {rope_type} scaling needs a positive number")
            out["rope_factor"] = check_positive_number(f"{key}.factor", rope["factor"])
        if type_key in rope:
            out["rope_type"] = rope_type
    return out


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
