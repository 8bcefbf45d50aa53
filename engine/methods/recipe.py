"""The method a recipe runs (``--recipe``): one sub-method per distinct (method, options), dispatched per linear.

``RecipeMethod`` holds a :class:`~tritonq.engine.recipe.Recipe` and, once :meth:`RecipeMethod.bind` has seen the
model's linears (preflight, before calibration), the choice of every linear: its sub-method and its grid, or
``skip`` (left in float: ``layer_grid`` returns None and the pipeline passes the group by). Every call of the
contract goes to the sub-method of the group's linears, as ``WithActivationQuant`` delegates to its inner method;
a recipe that names one method runs it exactly as ``--method`` does (same weights, byte for byte).

``bind`` checks, with the whole recipe at once, what needs the model; each problem is one line of one error:
a regex that matches no linear, an option a method does not take, a grid that does not divide a layer, linears
that share one input (q/k/v; gate/up) given different schemes, a block-scope method (AutoRound) beside another
method or a skip inside one block, and a method whose ``prepare`` transforms the whole model used on only some
layers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import torch.nn as nn

from ...errors import TritonqError
from ..activations import ActSpec
from ..grid import GridSpec
from ..recipe import Recipe, Rule, Scheme
from .base import LayerResult, Method
from .registry import make_method

if TYPE_CHECKING:
    from ..adapters import Adapter
    from ..distributed import Collective
    from ..groups import BlockGroup, Group


@dataclass(frozen=True)
class LayerChoice:
    """One linear's scheme: its sub-method (None when skipped) and the grid fields set on top of the run's."""

    method: Method | None
    grid: dict  # GridSpec fields the recipe sets (bits, group_size, sym)
    rule: Rule | None  # the rule that matched (None: the default)

    @property
    def skip(self) -> bool:
        return self.method is None

    @property
    def source(self) -> str:
        return "the default" if self.rule is None else self.rule.label


class RecipeMethod(Method):
    """Per-layer methods and grids from a recipe; ``cli_method`` / ``cli_options`` fill what the recipe leaves out
    (the method when the recipe's default names none, and the options of that method's layers)."""

    name = "recipe"
    summary = "per-layer methods and grids from --recipe FILE (engine/recipe.py)"

    def __init__(self, recipe: Recipe, cli_method: str = "gptq", cli_options: Any = None) -> None:
        self.recipe = recipe
        self.options = self.Options()
        self.default_method = recipe.default.method or cli_method
        self._cli = (cli_method, _option_dict(cli_options))
        self._methods: dict[tuple, Method] = {}  # (name, options) -> the one instance of that sub-method
        self.choices: dict[str, LayerChoice] = {}
        self._spec: GridSpec | None = None  # the run's grid, once bound
        problems: list[str] = []
        self._default_sub = self._sub(self.default_method, recipe.default.options, "the default", problems)
        self._rule_subs = [None if r.scheme.skip else
                           self._sub(r.scheme.method or self.default_method, r.scheme.options, r.label, problems)
                           for r in recipe.rules]
        acts = {m.default_act: m.name for m in self.methods if m.default_act is not None}
        if len(acts) > 1:
            problems.append(f"methods {' and '.join(sorted(acts.values()))} quantize activations differently; a run "
                            "has one activation setting, so use one of them")
        if problems:
            raise TritonqError("\n".join(f"{recipe.source}: {p}" for p in problems))

    def _sub(self, method: str, options: dict, where: str, problems: list[str]) -> Method | None:
        cli_name, cli_options = self._cli
        merged = {**(cli_options if method == cli_name else {}),
                  **(self.recipe.default.options if method == self.default_method else {}), **options}
        try:
            made = make_method(method, merged)
        except TritonqError as exc:
            problems.append(f"{where}: {exc}")
            return None
        except TypeError as exc:
            problems.append(f"{where}: method {method} options {merged}: {exc}")
            return None
        # one instance per effective (method, options): an option spelled out at its default is the same method
        return self._methods.setdefault((method, repr(asdict(made.options))), made)

    @property
    def methods(self) -> list[Method]:
        return list(self._methods.values())

    # --- binding to the model (preflight)

    def bind(self, adapter: Adapter, widths: dict[str, int], spec: GridSpec) -> None:
        """Resolve every linear of the model (``widths``: full name -> input width) and check the recipe against
        it; ``spec`` is the run's grid. Raises one :class:`TritonqError`, a line per problem."""
        problems: dict[tuple, list[str]] = {}  # one line per kind of problem, the first linear named
        used: set[int] = set()
        choices: dict[str, LayerChoice] = {}
        for name in widths:
            rule = self.recipe.rule_for(name)
            if rule is None:
                choices[name] = LayerChoice(self._default_sub, self.recipe.default.grid_fields(), None)
                continue
            used.add(rule.index)
            sub = self._rule_subs[rule.index - 1]
            choices[name] = LayerChoice(sub, rule.scheme.grid_fields(), rule)
        for rule in self.recipe.rules:
            if rule.index not in used:
                example = next(iter(widths), "")
                problems[("unused", rule.index)] = [
                    f"{rule.label} matches no linear of this model (e.g. {example!r}); fix the regex or drop the rule "
                    "(an earlier rule may match first)"]
        self.choices, self._spec = choices, spec
        for name, choice in choices.items():
            if not choice.skip:
                try:
                    self.layer_grid(name, spec).groups_for(widths[name], name)
                except TritonqError as exc:
                    problems.setdefault(("grid", choice.source, _leaf(name)), []).append(f"{choice.source}: {exc}")
        self._check_groups(adapter, len(widths) // len(adapter.linear_names()), spec, problems)
        for line in self._check_prepare():
            problems[("prepare",)] = [line]
        if problems:
            raise TritonqError("\n".join(f"{self.recipe.source}: {same[0]}" + (
                f" (and {len(same) - 1} more like it)" if len(same) > 1 else "") for same in problems.values()))

    def _check_groups(self, adapter: Adapter, blocks: int, spec: GridSpec, problems: dict[tuple, list[str]]) -> None:
        """Linears sharing one input agree; a block-scope method has its block to itself."""
        for i in range(blocks):
            prefix = f"{adapter.blocks}.{i}."
            for names in adapter.linear_groups:
                full = [prefix + n for n in names]
                differing = [n for n in full if self._key(n, spec) != self._key(full[0], spec)]
                if differing:
                    a, b = full[0], differing[0]
                    key = ("share", names, self.choices[a].source, self.choices[b].source)
                    problems.setdefault(key, []).append(
                        f"{a} ({self.choices[a].source}: {self._describe(a, spec)}) and {b} "
                        f"({self.choices[b].source}: {self._describe(b, spec)}) share one input and are quantized "
                        f"together; give {', '.join(n.rsplit('.', 1)[-1] for n in full)} one rule (e.g. match "
                        f"'{re_group(names)}')")
            subs = {id(self.choices[prefix + n].method): self.choices[prefix + n] for n in adapter.linear_names()}
            if len(subs) > 1 and any(c.method is not None and c.method.scope == "block" for c in subs.values()):
                block_sub = next(c for c in subs.values() if c.method is not None and c.method.scope == "block")
                problems.setdefault(("block", block_sub.source), []).append(
                    f"block {i}: {block_sub.source} gives it {block_sub.method.name}, which optimises whole blocks "
                    "(scope 'block'), beside other methods or skips; give every linear of a block the same "
                    "block-scope method (match the block, e.g. 'layers\\.3\\.')")

    def _check_prepare(self) -> list[str]:
        """A ``prepare`` that transforms the whole model is safe only when its method quantizes every layer."""
        preparing = [m for m in self.methods if type(m).prepare is not Method.prepare]
        if not preparing:
            return []
        used = {id(c.method) for c in self.choices.values()}
        if len(used) > 1 or id(preparing[0]) not in used:
            return [f"method {preparing[0].name} transforms the whole model before calibration (prepare), so it "
                    "cannot be mixed with other methods or skips; use it for every layer or not at all"]
        return []

    def _key(self, name: str, spec: GridSpec) -> tuple:
        """What must agree within a linear group: the sub-method instance and the grid."""
        choice = self.choices[name]
        return ("skip",) if choice.method is None else (id(choice.method), self.layer_grid(name, spec))

    def _describe(self, name: str, spec: GridSpec) -> str:
        choice = self.choices[name]
        if choice.skip:
            return "skip"
        grid = self.layer_grid(name, spec)
        assert grid is not None and choice.method is not None
        group = "per channel" if grid.group_size == -1 else f"g{grid.group_size}"
        same_name = [m for m in self.methods if m.name == choice.method.name]
        return f"{choice.method.name} {grid.bits}-bit {group} {'sym' if grid.sym else 'asym'}" + (
            "" if len(same_name) < 2 else f" {_short_options(choice.method)}")

    def _choice(self, name: str) -> LayerChoice:
        if name not in self.choices:
            raise TritonqError(f"the recipe was not bound to this model (no scheme for {name}); preflight binds it")
        return self.choices[name]

    def _method_of(self, names: list[str]) -> Method:
        method = self._choice(names[0]).method
        if method is None:
            raise TritonqError(f"{names[0]} is skipped by the recipe and must not be quantized")
        return method

    # --- the contract, per group

    @property
    def calibrated(self) -> bool:  # type: ignore[override]
        return any(m.calibrated for m in self.methods)

    @property
    def default_act(self) -> ActSpec | None:  # type: ignore[override]
        """The activation setting the recipe's methods declare (the run's applies to every quantized linear)."""
        declared = {m.default_act for m in self.methods if m.default_act is not None}
        return declared.pop() if len(declared) == 1 else None  # several: refused at construction

    @property
    def receives_act(self) -> bool:  # type: ignore[override]
        return any(m.receives_act for m in self.methods)

    def set_activation(self, act: ActSpec) -> None:
        for method in self.methods:
            if method.receives_act:
                method.set_activation(act)

    @property
    def needs_grad(self) -> bool:  # type: ignore[override]
        return any(m.needs_grad for m in self.methods)

    @property
    def scope(self) -> str:  # type: ignore[override]
        return "block" if any(m.scope == "block" for m in self.methods) else "group"

    def block_scope(self, index: int) -> str:
        subs = self._block_methods(index)
        return subs[0].block_scope(index) if subs else "group"

    def _block_methods(self, index: int) -> list[Method]:
        return [c.method for n, c in self.choices.items() if _block_index(n) == index and c.method is not None]

    @property
    def float_targets(self) -> bool:  # type: ignore[override]
        """Whether any block-scope method wants the float path; group-scope blocks then carry it through."""
        return any(m.float_targets for m in self.methods if m.scope == "block")

    def block_prepass(self, index: int) -> Method | None:
        subs = self._block_methods(index)  # bind refused a block-scope method beside another in one block
        return subs[0].block_prepass(index) if subs and subs[0].scope == "block" else None

    @property
    def data_parallel(self) -> str:  # type: ignore[override]
        modes = {m.data_parallel for m in self.methods}
        return "refused" if "refused" in modes else "solve" if modes == {"solve"} else "replicated"

    @property
    def data_parallel_refusal(self) -> str:  # type: ignore[override]
        refusing = [m for m in self.methods if m.data_parallel == "refused"]
        return f"its method {refusing[0].name}: {refusing[0].data_parallel_refusal}" if refusing else ""

    def act_order_groups(self) -> str | None:
        kinds = {m.act_order_groups() for m in self.methods}
        return "dynamic" if "dynamic" in kinds else "static" if "static" in kinds else None

    def layer_grid(self, name: str, spec: GridSpec) -> GridSpec | None:
        choice = self._choice(name)
        if choice.method is None:
            return None
        return choice.method.layer_grid(name, replace(spec, **choice.grid) if choice.grid else spec)

    def prepare(self, model: nn.Module, adapter: Adapter) -> None:
        for method in self.methods:  # bind refused a preparing method unless it quantizes every layer
            if type(method).prepare is not Method.prepare:
                method.prepare(model, adapter)

    def observe(self, group: Group) -> Any:
        method = self._method_of(group.full_names)
        return method, method.observe(group)

    def reduce(self, state: Any, collective: Collective) -> Any:
        method, inner = state
        return method, method.reduce(inner, collective)

    def quantize(self, group: Group, state: Any) -> list[LayerResult]:
        method, inner = state
        return method.quantize(group, inner)

    def quantize_block(self, block: BlockGroup) -> list[LayerResult]:
        return self._method_of(block.full_names).quantize_block(block)

    def wrap(self, group: Group, name: str, linear: nn.Module) -> nn.Module | None:
        full = f"{group.adapter.blocks}.{group.index}.{name}"
        return self._method_of([full]).wrap(group, name, linear)

    # --- the record

    def resolved(self, spec: GridSpec) -> Recipe:
        """The recipe with every field filled in (the run's grid ``spec``, each method's full options): replaying
        it gives the same run whatever the flags."""
        default = Scheme(self.default_method, spec.bits, spec.group_size, spec.sym,
                         _options_of(self._default_sub))
        rules = tuple(Rule(r.match, r.scheme if r.scheme.skip else
                           replace(r.scheme, method=sub.name, options=_options_of(sub)), r.index)
                      for r, sub in zip(self.recipe.rules, self._rule_subs))
        return Recipe(default, rules, self.recipe.source)

    def layer_record(self, spec: GridSpec) -> dict[str, dict]:
        """Every linear's resolved scheme: ``{method, bits, group_size, sym}`` or ``{skip: true}``."""
        out = {}
        for name, choice in sorted(self.choices.items()):
            grid = self.layer_grid(name, spec)
            out[name] = {"skip": True} if grid is None or choice.method is None else {
                "method": choice.method.name, "bits": grid.bits, "group_size": grid.group_size, "sym": grid.sym}
        return out

    def describe(self) -> dict:
        """What ``quantization.json`` records: the methods used, act-order, and once bound the resolved recipe with
        every linear's scheme (``recipe``), which ``--recipe quantization.json`` replays."""
        out: dict = {"methods": sorted({m.name for m in self.methods}),
                     "act_order": self.act_order_groups() is not None}
        if self._spec is not None:
            out["recipe"] = {**self.resolved(self._spec).to_dict(), "layers": self.layer_record(self._spec)}
        return out


def _option_dict(options: Any) -> dict:
    if options is None:
        return {}
    return dict(options) if isinstance(options, dict) else asdict(options)


def _options_of(method: Method | None) -> dict:
    return {} if method is None else asdict(method.options)


def _short_options(method: Method) -> str:
    return "(" + ", ".join(f"{k}={v}" for k, v in asdict(method.options).items()) + ")"


def _leaf(name: str) -> str:
    """A linear's name inside its block (``model.layers.3.mlp.up_proj`` -> ``mlp.up_proj``)."""
    parts = name.split(".")
    index = next((i for i, p in enumerate(parts) if p.isdigit()), -1)
    return ".".join(parts[index + 1:])


def _block_index(name: str) -> int | None:
    """The block index in a full linear name (``model.layers.3.mlp.up_proj`` -> 3)."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def re_group(names: tuple[str, ...]) -> str:
    """A regex matching the linears of one group (``self_attn\\.(q_proj|k_proj|v_proj)``), for a hint."""
    parents = {n.rpartition(".")[0] for n in names}
    leaves = "|".join(n.rpartition(".")[2] for n in names)
    parent = parents.pop() if len(parents) == 1 else ""
    return (parent.replace(".", "\\.") + "\\." if parent else "") + (f"({leaves})" if len(names) > 1 else leaves)
