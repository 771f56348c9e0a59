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

import difflib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from quantkit.backends.registry import QuantConfig
from quantkit.errors import QuantkitError
from quantkit.model.layout import NOT_QUANTIZED, local_name, parse


IGNORED = -1  # Recipe.winner's answer for a module an ignore pattern keeps in full precision


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
                raise QuantkitError(f"pattern '{pattern}' is not a valid regular expression ({e})") from None

    @classmethod
    def of(cls, config: "QuantConfig | Recipe", ignore: tuple[str, ...] | list[str] = ()) -> "Recipe":
        recipe = config if isinstance(config, Recipe) else cls(default=config)
        return cls(recipe.default, list(recipe.rules), list(recipe.ignore) + list(ignore)) if ignore else recipe

    def winner(self, name: str) -> int | None:
        """Which entry decides module `name`: IGNORED, the index of the first matching rule, or None (default)."""
        if any(re.search(p, name) for p in self.ignore):
            return IGNORED
        return next((i for i, (pattern, _) in enumerate(self.rules) if re.search(pattern, name)), None)

    def config_for(self, name: str) -> QuantConfig | None:
        index = self.winner(name)
        if index == IGNORED:
            return None
        return self.default if index is None else self.rules[index][1]

    def assign(self, linears: Sequence[str], others: Sequence[str] = ()) -> dict[str, QuantConfig | None]:
        """Each decoder linear's config (None: kept in full precision), once every pattern is known to do something.

        linears: the model's decoder linears; others: its other modules (embedding, norms, lm_head), full names
        (quantkit.model.layout.module_names). Raises QuantkitError, naming the pattern, for a rule that matches
        a module quantkit does not quantize (NOT_QUANTIZED), a rule or ignore pattern that matches no module
        (with the closest names), and a rule that decides no module (every match is ignored or taken by an
        earlier rule): each would otherwise be a request silently not applied. llm-compressor refuses
        targets that match nothing the same way.
        """
        for pattern in self.ignore:
            if not any(re.search(pattern, n) for n in [*linears, *others]):
                raise _no_match("ignore pattern", pattern, linears, others)
        for i, (pattern, _) in enumerate(self.rules):
            refused = [n for n in others if n in NOT_QUANTIZED and re.search(pattern, n)]
            if refused:
                raise QuantkitError(f"recipe rule '{pattern}' matches {refused[0]}, which it cannot apply to: "
                                    f"{NOT_QUANTIZED[refused[0]]}: narrow the pattern to decoder linears "
                                    f"(e.g. 'layers\\.') or remove the rule")
            if not any(re.search(pattern, n) for n in linears):
                elsewhere = [n for n in others if re.search(pattern, n)]
                if elsewhere:
                    raise QuantkitError(f"recipe rule '{pattern}' matches only modules that are not decoder linears "
                                        f"({elsewhere[0]}{' and more' if len(elsewhere) > 1 else ''}), which quantkit "
                                        f"does not quantize: name q/k/v/o_proj or gate/up/down_proj")
                raise _no_match("recipe rule", pattern, linears, others)
        winners = {name: self.winner(name) for name in linears}
        for i, (pattern, _) in enumerate(self.rules):
            if i not in winners.values():
                raise _shadowed(self, i, [n for n in linears if re.search(pattern, n)], winners)
        return {name: self.config_for(name) for name in linears}

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


def closest_names(pattern: str, names: Sequence[str], n: int = 3) -> list[str]:
    """The module names (or names inside a layer, or layer prefixes) nearest to a pattern's literal text."""
    literal = re.sub(r"\\(.)", r"\1", pattern).strip("^$")
    candidates = {local_name(name) for name in names}
    candidates |= {name[: len(name) - len(local_name(name))] for name in names if parse(name)[0] is not None}
    return difflib.get_close_matches(literal, sorted(candidates), n=n, cutoff=0.4)


def _no_match(what: str, pattern: str, linears: Sequence[str], others: Sequence[str]) -> QuantkitError:
    close = closest_names(pattern, [*linears, *others])
    hint = f"the closest names are {', '.join(map(repr, close))}" if close else "nothing is close"
    layers = sorted({parse(name)[0] for name in linears} - {None})
    if layers:
        hint += f"; its decoder layers are {layers[0]} to {layers[-1]}"
    example = linears[0] if linears else "model.layers.0.mlp.down_proj"
    return QuantkitError(f"{what} '{pattern}' matches no module of the model ({hint}; patterns are regular "
                         f"expressions searched in full names such as {example!r}): fix the pattern")


def _shadowed(recipe: Recipe, index: int, matched: list[str], winners: dict[str, int | None]) -> QuantkitError:
    pattern = recipe.rules[index][0]
    taken = winners[matched[0]]
    by = "an ignore pattern keeps it in full precision" if taken == IGNORED else \
        f"rule {taken + 1} ('{recipe.rules[taken][0]}') comes first and the first matching rule wins"
    return QuantkitError(f"recipe rule {index + 1} ('{pattern}') decides no module: every module it matches "
                         f"({matched[0]}{' and more' if len(matched) > 1 else ''}) is taken by another entry "
                         f"({by}): reorder or remove the rules")
