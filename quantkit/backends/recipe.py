"""Recipes: which config each module gets, for mixed precision, and which modules stay unquantized.

A `Recipe` maps module-name patterns (regular expressions searched in the full name, such as
`model.layers.3.mlp.down_proj`) to configs; the first matching rule wins, `ignore` patterns keep a
module in full precision, and `default` covers the rest. Recipe files are JSON or YAML:

    default: {method: int4, group_size: 128}
    rules:
      - {pattern: 'mlp\.down_proj$', config: {method: rtn, bits: 8, group_size: -1}}
    ignore: ['layers\.0\.']
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from quantkit.backends.registry import QuantConfig
from quantkit.errors import QuantkitError


@dataclass
class Recipe:
    """default config + ordered (pattern -> config) rules + ignore patterns; the first matching rule wins."""

    default: QuantConfig | None
    rules: list[tuple[str, QuantConfig]] = field(default_factory=list)
    ignore: list[str] = field(default_factory=list)

    def __post_init__(self):
        for pattern in [p for p, _ in self.rules] + list(self.ignore):
            try:
                re.compile(pattern)
            except re.error as e:
                raise QuantkitError(f"pattern {pattern!r} is not a valid regular expression ({e})") from None

    @classmethod
    def of(cls, config: "QuantConfig | Recipe", ignore: tuple[str, ...] | list[str] = ()) -> "Recipe":
        recipe = config if isinstance(config, Recipe) else cls(default=config)
        return cls(recipe.default, list(recipe.rules), list(recipe.ignore) + list(ignore)) if ignore else recipe

    def config_for(self, name: str) -> QuantConfig | None:
        if any(re.search(p, name) for p in self.ignore):
            return None
        for pattern, config in self.rules:
            if re.search(pattern, name):
                return config
        return self.default

    def configs(self) -> list[QuantConfig]:
        return [c for c in [self.default, *(c for _, c in self.rules)] if c is not None]

    def to_dict(self) -> dict:
        return {"default": self.default.to_dict() if self.default else None,
                "rules": [{"pattern": p, "config": c.to_dict()} for p, c in self.rules], "ignore": list(self.ignore)}

    @classmethod
    def from_dict(cls, d: dict, source: str = "recipe") -> "Recipe":
        if not isinstance(d, dict) or not set(d) <= {"default", "rules", "ignore"}:
            raise QuantkitError(f"{source}: a recipe is a mapping with keys default, rules, ignore")
        try:
            default = QuantConfig.from_dict(d["default"]) if d.get("default") else None
            rules = [(r["pattern"], QuantConfig.from_dict(r["config"])) for r in d.get("rules") or []]
        except (KeyError, TypeError) as e:
            raise QuantkitError(f"{source}: each rule needs 'pattern' and 'config' ({e!r})") from None
        except QuantkitError as e:
            raise QuantkitError(f"{source}: {e}") from None
        return cls(default, rules, list(d.get("ignore") or []))

    @classmethod
    def from_file(cls, path: str | Path) -> "Recipe":
        path = Path(path)
        if not path.is_file():
            raise QuantkitError(f"{path}: no such recipe file")
        text = path.read_text()
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as e:  # json and yaml raise their own error types for a malformed file
            raise QuantkitError(f"{path}: not valid {path.suffix.lstrip('.').upper() or 'JSON'} ({e})") from None
        return cls.from_dict(data, source=str(path))
