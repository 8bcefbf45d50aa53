"""Mixed precision by recipe: a file that maps linear-name regexes to a method and a grid, or leaves them float.

A recipe (YAML or JSON; ``--recipe FILE``, ``QuantizeOptions(recipe=...)``)::

    default: {method: gptq, bits: 4, group_size: 64, sym: false}   # optional; what is missing comes from the flags
    rules:                                  # first match wins; ``match`` is searched (re.search) in the full name
      - match: 'mlp\\.down_proj'
        method: rtn
        bits: 8
        group_size: -1
        sym: true
      - match: 'layers\\.5\\.self_attn\\.o_proj'
        skip: true                          # left in float
      - match: 'self_attn'
        options: {damp: 0.05}               # fields of that method's Options

This module reads and checks the file on its own (keys, types, regexes, method names), collecting every problem
before it raises, one line each. What needs the model (a regex that matches nothing, a grid that does not
divide a layer, linears sharing one input given different schemes, a block-scope method beside others in one
block) is checked by :class:`~tritonq.engine.methods.recipe.RecipeMethod` at preflight, before calibration.

``quantization.json`` records the run's recipe with every field resolved (``Recipe.to_dict`` of
``RecipeMethod.resolved``) and the scheme of every linear (``layers``); :func:`load_recipe` accepts such a file
and replays its ``recipe`` entry. ``--method auto`` builds a ``Recipe`` with :meth:`Recipe.from_dict`.
Per-module schemes by regex are the peers' idea: GPTQModel's ``dynamic``, llm-compressor's recipes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import TritonqError
from .outputs import QUANT_JSON

TOP_KEYS = ("default", "rules")
SCHEME_KEYS = ("method", "bits", "group_size", "sym", "options")
RULE_KEYS = ("match", *SCHEME_KEYS, "skip")
RECORD_KEYS = ("layers",)  # what quantization.json adds beside a recipe (read back, not used to resolve)


@dataclass(frozen=True)
class Scheme:
    """What a rule (or the default) sets; ``None`` fields are inherited (rule -> default -> the run's flags)."""

    method: str | None = None
    bits: int | None = None
    group_size: int | None = None
    sym: bool | None = None
    options: dict = field(default_factory=dict, hash=False, compare=True)
    skip: bool = False

    def to_dict(self) -> dict:
        if self.skip:
            return {"skip": True}
        out = {k: getattr(self, k) for k in ("method", "bits", "group_size", "sym") if getattr(self, k) is not None}
        if self.options:
            out["options"] = dict(self.options)
        return out

    def grid_fields(self) -> dict:
        """The grid fields this scheme sets (``dataclasses.replace`` arguments for a ``GridSpec``)."""
        return {k: getattr(self, k) for k in ("bits", "group_size", "sym") if getattr(self, k) is not None}


@dataclass(frozen=True)
class Rule:
    match: str
    scheme: Scheme
    index: int  # 1-based position in the file, for messages

    @property
    def label(self) -> str:
        return f"rule {self.index} ({self.match!r})"

    def matches(self, name: str) -> bool:
        return re.search(self.match, name) is not None


@dataclass(frozen=True)
class Recipe:
    """A parsed, structurally valid recipe. ``source`` names where it came from (for messages)."""

    default: Scheme = field(default_factory=Scheme)
    rules: tuple[Rule, ...] = ()
    source: str = "recipe"

    @classmethod
    def from_dict(cls, data: Any, source: str = "recipe") -> Recipe:
        """Parse a recipe dict; every problem found is one line of the one :class:`TritonqError` raised."""
        problems: list[str] = []
        if not isinstance(data, dict):
            raise TritonqError(f"{source}: a recipe is a mapping with 'default' and/or 'rules', got "
                               f"{type(data).__name__}")
        for key in data:
            if key not in TOP_KEYS + RECORD_KEYS:
                problems.append(f"{source}: unknown key {key!r}; a recipe takes {', '.join(TOP_KEYS)}")
        default = Scheme()
        if data.get("default") is not None:
            default = _scheme(data["default"], SCHEME_KEYS, f"{source}: default", problems)
        rules: list[Rule] = []
        raw_rules = data.get("rules") or []
        if not isinstance(raw_rules, list):
            problems.append(f"{source}: 'rules' must be a list of rules, got {type(raw_rules).__name__}")
            raw_rules = []
        for i, raw in enumerate(raw_rules, 1):
            where = f"{source}: rule {i}"
            if not isinstance(raw, dict):
                problems.append(f"{where}: a rule is a mapping with 'match' and scheme keys, got {type(raw).__name__}")
                continue
            pattern = raw.get("match")
            if not isinstance(pattern, str) or not pattern:
                problems.append(f"{where}: needs 'match', a regex searched in each linear's full name "
                                "(e.g. 'mlp\\.down_proj')")
                pattern = None
            else:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    problems.append(f"{where}: 'match' {pattern!r} is not a valid regex ({exc}); fix or escape it")
                    pattern = None
            scheme = _scheme({k: v for k, v in raw.items() if k != "match"}, RULE_KEYS[1:], where, problems, RULE_KEYS)
            if pattern is not None:
                rules.append(Rule(pattern, scheme, i))
        if not problems and not rules and data.get("default") is None:
            problems.append(f"{source}: the recipe sets nothing; give 'default' and/or 'rules'")
        if problems:
            raise TritonqError("\n".join(problems))
        return cls(default, tuple(rules), source)

    def to_dict(self) -> dict:
        out: dict = {}
        if self.default.to_dict():
            out["default"] = self.default.to_dict()
        if self.rules:
            out["rules"] = [{"match": r.match, **r.scheme.to_dict()} for r in self.rules]
        return out

    def rule_for(self, name: str) -> Rule | None:
        """The first rule whose regex is found in ``name`` (None: the default applies)."""
        return next((r for r in self.rules if r.matches(name)), None)

    def method_names(self, fallback: str) -> set[str]:
        """Every method the recipe may use (``fallback``: the method when the default names none)."""
        default = self.default.method or fallback
        return {default} | {r.scheme.method or default for r in self.rules if not r.scheme.skip}


def _scheme(raw: Any, allowed: tuple[str, ...], where: str, problems: list[str],
            shown: tuple[str, ...] = ()) -> Scheme:
    """One scheme (the default or a rule without its ``match``), its problems appended to ``problems``."""
    if not isinstance(raw, dict):
        problems.append(f"{where}: must be a mapping of {', '.join(shown or allowed)}, got {type(raw).__name__}")
        return Scheme()
    unknown = [k for k in raw if k not in allowed]
    for key in unknown:
        problems.append(f"{where}: unknown key {key!r}; allowed keys: {', '.join(shown or allowed)}")
    skip = raw.get("skip", False)
    if not isinstance(skip, bool):
        problems.append(f"{where}: 'skip' must be true or false, got {skip!r}")
        skip = False
    if skip:
        extra = [k for k in raw if k not in ("skip", *unknown)]
        if extra:
            problems.append(f"{where}: a skip rule leaves its linears in float; drop {', '.join(extra)} "
                            "(it takes only 'match' and 'skip')")
        return Scheme(skip=True)
    method = raw.get("method")
    if method is not None:
        from .methods.registry import METHODS

        if not isinstance(method, str) or method not in METHODS:
            problems.append(f"{where}: unknown method {method!r}; choose one of {', '.join(METHODS)}")
            method = None
    bits = raw.get("bits")
    if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8):
        problems.append(f"{where}: 'bits' must be an integer from 2 to 8, got {bits!r}")
        bits = None
    group = raw.get("group_size")
    if group is not None and (isinstance(group, bool) or not isinstance(group, int) or (group < 1 and group != -1)):
        problems.append(f"{where}: 'group_size' must be -1 (per channel) or a positive integer, got {group!r}")
        group = None
    sym = raw.get("sym")
    if sym is not None and not isinstance(sym, bool):
        problems.append(f"{where}: 'sym' must be true or false, got {sym!r}")
        sym = None
    options = raw.get("options") or {}
    if not isinstance(options, dict):
        problems.append(f"{where}: 'options' must be a mapping of the method's option names to values "
                        f"(e.g. {{damp: 0.05}}), got {type(options).__name__}")
        options = {}
    return Scheme(method, bits, group, sym, dict(options))


def load_recipe(recipe: str | Path | dict | Recipe) -> Recipe:
    """A recipe from a dict, a ``Recipe``, or a file: ``.json`` (a recipe, or a ``quantization.json`` whose
    ``recipe`` entry replays a run), ``.yaml`` / ``.yml`` (PyYAML, which transformers already installs)."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(_replayed(recipe, "recipe"), "recipe")
    path = Path(recipe).expanduser()
    if path.is_dir() and (path / QUANT_JSON).is_file():  # an output directory: replay its run
        path = path / QUANT_JSON
    if not path.is_file():
        raise TritonqError(f"--recipe {recipe}: no such file; give a .yaml or .json recipe, or a {QUANT_JSON}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise TritonqError(f"--recipe {path}: reading YAML needs PyYAML (pip install pyyaml); or write the "
                               "recipe as JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            at = f" at line {where.line + 1}" if where is not None else ""
            raise TritonqError(f"--recipe {path}: not valid YAML{at} ({getattr(exc, 'problem', exc)})") from None
    elif path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TritonqError(f"--recipe {path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    else:
        raise TritonqError(f"--recipe {path}: give a .yaml, .yml or .json file")
    return Recipe.from_dict(_replayed(data, str(path)), str(path))


def _replayed(data: Any, source: str) -> Any:
    """A ``quantization.json`` (it has ``method`` and ``layers``) stands for the recipe it records."""
    if isinstance(data, dict) and "method" in data and "layers" in data and "rules" not in data:
        if not isinstance(data.get("recipe"), dict):
            raise TritonqError(f"{source} records a run without a recipe (method {data['method']}); replay it with "
                               f"--method {data['method']} and its flags instead")
        return data["recipe"]
    return data
