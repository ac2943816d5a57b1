"""The one registry type behind every ``@register_*`` decorator (models, backbones, data sets, backends...).

A plain dict that refuses to register a name twice: a second module registering ``"dinov2"`` would
otherwise silently replace the first one, and which one wins would depend on import order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

V = TypeVar("V")


class Registry(dict[str, V]):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def __setitem__(self, name: str, value: V) -> None:
        if name in self:
            raise ValueError(f"{self.kind} {name!r} is already registered ({self[name]!r}); pick another name")
        super().__setitem__(name, value)

    def register(self, name: str) -> Callable[[V], V]:
        """Decorator: ``@REGISTRY.register("name")`` adds the function or class under ``name``."""

        def deco(value: V) -> V:
            self[name] = value
            return value

        return deco

    def lookup(self, name: str) -> V:
        """The entry ``name``; an unknown name is a ``ValueError`` that lists what there is."""
        if name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}; available: {', '.join(sorted(self)) or 'none'}")
        return self[name]

    def names(self) -> list[str]:
        return sorted(self)
