"""The backend registry: one config dataclass per method, a handler registered for it, lookup by type.

As in torchao's quant_api: `@register_backend(...)` ties a config class to a handler that turns one
nn.Linear into its quantized module; `quantkit.quantize(model, config)` dispatches on type(config).
String names (`int4`, `bnb-nf4`, ...) exist only at the edges (CLI, JSON). Third-party packages add
backends through the entry-point group `quantkit.backends`: each entry point names a module (or a
callable) that registers its backends when loaded.

A backend that learns from calibration data declares an `observer` (quantkit.quant.observers): one is made
per target linear, fed that linear's inputs during the calibration forward passes, and hands the
handler its statistics as keyword arguments (GPTQ: `hessian=`). It may also declare a `transform`
that rewrites a sequential group before it is quantized, and a `layer_transform` that rewrites the whole layer
before any of it is quantized (activation-aware scaling: AWQ's four scalings, then GPTQ on the scaled layer). See
quantkit/run/calibrator.py for the phases: collect, transform, quantize, advance.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import typing
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, ClassVar

from torch import nn

from quantkit.errors import QuantkitError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "quantkit.backends"


CONFIG_VERSION = 1  # of to_dict()'s layout; from_dict reads this version and dicts without one (older files)
BOOLEANS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
NONES = ("none", "null")


class QuantConfig:
    """Base of every backend's config: a `@dataclass(frozen=True)` subclass (a value: hashable, comparable, safe to
    share between modules) that validates itself in __post_init__; registration sets `method`. The config
    round-trips through to_dict() / from_dict(), and from_strings() types text values (the CLI's -O KEY=VALUE) by
    the dataclass's own type hints, so a plugin's config gets both for free."""

    method: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "version": CONFIG_VERSION, **dataclasses.asdict(self)}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "QuantConfig":
        """The config of a to_dict(); QuantkitError naming an unknown method or field, or a newer version."""
        d = dict(d)
        method, version = d.pop("method", None), d.pop("version", CONFIG_VERSION)
        if not isinstance(version, int) or isinstance(version, bool) or version > CONFIG_VERSION:
            raise QuantkitError(f"{method}: config version {version!r} is newer than this quantkit reads "
                                f"({CONFIG_VERSION}): upgrade quantkit")
        cls = BACKENDS.get(method).config_cls
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise QuantkitError(f"{method}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(**d)

    @staticmethod
    def from_strings(d: dict[str, str]) -> "QuantConfig":
        """A config from text values, e.g. {"method": "gptq", "bits": "4", "desc_act": "true"}, each typed by the
        config field's type hint (int, float, bool: true/false/yes/no/on/off/1/0, str; "none" for an optional
        field). QuantkitError naming the field for a value of the wrong type, or an unknown field."""
        d = dict(d)
        method = d.pop("method", None)
        return QuantConfig.from_dict({"method": method, **BACKENDS.get(method).config_cls.parse_strings(d)})

    @classmethod
    def parse_strings(cls, d: dict[str, str]) -> dict[str, Any]:
        """Text values typed by this config's field type hints; keys that are no field pass on unchanged."""
        hints = typing.get_type_hints(cls)
        fields = {f.name for f in dataclasses.fields(cls)}
        return {k: _typed(cls.method, k, v, hints[k]) if k in fields else v for k, v in d.items()}

    def describe(self) -> str:
        return self.method + "(" + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(self).items()) + ")"


def _typed(method: str, key: str, text: str, hint) -> Any:
    kinds = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    optional = type(None) in typing.get_args(hint)
    if optional and text.strip().lower() in NONES:
        return None
    kind = kinds[0] if len(kinds) == 1 else str
    try:
        if kind is bool:
            return BOOLEANS[text.strip().lower()]
        if kind in (int, float):
            return kind(text)
    except (KeyError, ValueError):
        want = {bool: "true or false", int: "an integer", float: "a number"}[kind]
        raise QuantkitError(f"{method}: {key}={text}: {key} is {want}") from None
    return text


def distinct_configs(configs) -> list[QuantConfig]:
    """The configs without repeats, in order."""
    return list(dict.fromkeys(configs))


LinearHandler = Callable[..., nn.Module]  # (linear, config, module name, **observer statistics) -> module


def dequantize(module: nn.Module):
    """The default dense weight of a quantized module: its own `dequantize()` (AffineLinear's)."""
    return module.dequantize()


@dataclass(frozen=True)
class Backend:
    name: str
    config_cls: type
    handler: LinearHandler  # (linear, config, module name, **stats) -> quantized module
    devices: tuple[str, ...]  # where its kernels run: "cpu", "cuda"
    formats: tuple[str, ...] = ()  # preferred export formats, the first is the default; () = any that holds it
    requires: tuple[str, ...] = ()  # importable packages
    description: str = ""
    observer: Callable | None = None  # (linear, config) -> Observer: the statistics its handler needs
    transform: Callable | None = None  # (GroupContext) -> None: rewrites a sequential group before quantizing
    dense_weight: Callable = dequantize  # (module) -> (N, K) float weight it computes with, or None
    layer_transform: Callable | None = None  # (LayerContext) -> None: rewrites a layer before any of it is quantized
    rewrites: Callable | None = None  # (config) -> bool: whether its transforms rewrite layers for this config
    #                                   (None: wherever it declares one)

    def rewrites_layers(self, config: QuantConfig) -> bool:
        """Whether a transform or layer transform of this backend rewrites layers for `config` (GPTQ: with awq)."""
        if self.transform is None and self.layer_transform is None:
            return False
        return self.rewrites is None or bool(self.rewrites(config))

    @property
    def needs_calibration(self) -> bool:
        return self.observer is not None or self.transform is not None or self.layer_transform is not None

    def unusable_reason(self) -> str | None:
        """Why this backend cannot run here, or None."""
        missing = [p for p in self.requires if importlib.util.find_spec(p) is None]
        if missing:
            return f"needs {', '.join(missing)}: pip install {' '.join(missing)}"
        if "cpu" not in self.devices:
            import torch

            if not torch.cuda.is_available():
                return f"runs on {', '.join(self.devices)} only, and no GPU is available here"
        return None

    def check_usable(self):
        reason = self.unusable_reason()
        if reason:
            raise QuantkitError(f"method {self.name} is not usable here: {reason}")


class Registry:
    def __init__(self):
        self._by_name: dict[str, Backend] = {}
        self._plugins_loaded = False

    def register(self, name: str, config_cls: type, *, devices: tuple[str, ...] = ("cpu", "cuda"),
                 formats: tuple[str, ...] = (), requires: tuple[str, ...] = (), description: str = "",
                 observer: Callable | None = None, transform: Callable | None = None,
                 dense_weight: Callable = dequantize, layer_transform: Callable | None = None,
                 rewrites: Callable | None = None):
        """Decorator for a handler `(linear, config, name, **stats) -> nn.Module` of config_cls (see Backend)."""
        if not (dataclasses.is_dataclass(config_cls) and config_cls.__dataclass_params__.frozen):
            raise QuantkitError(f"backend {name!r}: declare {config_cls.__qualname__} with @dataclass(frozen=True) "
                                f"(configs are values: hashable, shared between modules)")

        def decorate(handler: LinearHandler) -> LinearHandler:
            if name in self._by_name and self._by_name[name].config_cls is not config_cls:
                raise QuantkitError(f"backend name {name!r} is already registered by "
                                    f"{self._by_name[name].config_cls.__qualname__}")
            config_cls.method = name
            self._by_name[name] = Backend(name, config_cls, handler, tuple(devices), tuple(formats),
                                          tuple(requires), description, observer, transform, dense_weight,
                                          layer_transform, rewrites)
            return handler
        return decorate

    def _load_plugins(self):
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            before = dict(self._by_name)
            try:
                loaded = ep.load()
                if callable(loaded) and not isinstance(loaded, type):
                    loaded(self)
            except Exception as e:  # a broken plugin must not take the built-in backends down
                self._by_name = before  # nothing half-registered stays
                log.warning("quantkit backend plugin %s (%s) failed to load: %s", ep.name, ep.value, e)

    def all(self) -> list[Backend]:
        self._load_plugins()
        return list(self._by_name.values())

    def get(self, name: str | None) -> Backend:
        self._load_plugins()
        if name not in self._by_name:
            raise QuantkitError(f"unknown method {name!r}: known methods are {', '.join(self._by_name)}")
        return self._by_name[name]

    def for_config(self, config: QuantConfig) -> Backend:
        self._load_plugins()
        for backend in self._by_name.values():
            if type(config) is backend.config_cls:
                return backend
        raise QuantkitError(f"no backend is registered for {type(config).__qualname__}")


BACKENDS = Registry()
register_backend = BACKENDS.register
