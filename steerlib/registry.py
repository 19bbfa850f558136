"""The registries' two operations, in one place: a ``register("name")`` class decorator that fills an explicit dict,
and a lookup whose error for an unknown name lists the valid ones."""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping
from typing import Any, TypeVar

C = TypeVar("C", bound=type)
V = TypeVar("V")


def class_register(table: MutableMapping[str, Any], what: str, attr: str, name: str) -> Callable[[C], C]:
    """Class decorator: enter ``cls`` in ``table`` as ``name`` and set ``cls.<attr> = name``; a name taken raises."""

    def add(cls: C) -> C:
        if name in table:
            raise ValueError(f"{what} {name!r} is already registered by {table[name].__name__}")
        setattr(cls, attr, name)
        table[name] = cls
        return cls

    return add


def lookup(table: Mapping[str, V], what: str, name: str) -> V:
    """``table[name]``; an unknown name raises a ValueError naming ``what`` it is and listing the valid names."""
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown {what} {name!r}; valid: {', '.join(sorted(table))}") from None
