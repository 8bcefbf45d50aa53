"""The methods by name. Adding a method: one file with a ``Method`` subclass, plus one entry here.

The registry imports the method modules; a method module imports only ``methods.py`` (the base class)
and the shared cores (grid, Hessian), never this file, so nothing imports in a circle.
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from typing import Any

from ...errors import TritonqError
from .aboa import ABoA
from .auto import Auto
from .autoround import AutoRound
from .awq import AWQ, AWQGPTQ
from .awrq import AWRQ
from .base import Method
from .boa import BoA
from .dh_awq import DHAWQ
from .gptq import GPTQ
from .rtn import RTN
from .smoothquant import SmoothQuant

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (RTN, GPTQ, BoA, ABoA, AWQ, AWQGPTQ, DHAWQ, SmoothQuant,
                                                                AWRQ, AutoRound, Auto)}


def register(cls: type[Method]) -> type[Method]:
    """Add a method class (usable as a decorator); a name already taken is refused."""
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise TritonqError(f"a method named {cls.name!r} is already registered")
    if not is_dataclass(cls.Options):
        raise TritonqError(f"{cls.__name__}.Options must be a dataclass")
    METHODS[cls.name] = cls
    return cls


def methods_with_option(option: str) -> list[str]:
    """Names of the registered methods whose Options have a field ``option``."""
    return [name for name, cls in METHODS.items() if option in {f.name for f in fields(cls.Options)}]


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise TritonqError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name]


def make_method(name: str, options: Any = None) -> Method:
    """Instantiate a method: ``options`` is its Options dataclass, a dict of its fields, or None (defaults).

    A dict key that the method does not take is an error naming the method's options.
    """
    cls = method_class(name)
    if isinstance(options, dict):
        known = {f.name for f in fields(cls.Options)}
        unknown = sorted(set(options) - known)
        if unknown:
            takes = ", ".join(sorted(known)) or "no options"
            raise TritonqError(f"method {name} does not take {', '.join(unknown)} (it takes: {takes})")
        options = cls.Options(**options)
    return cls(options)
