"""Name -> function tables for SAPO's pluggable parts.

One table per kind: `reward` (reward terms), `advantage` (advantage estimators), `policy_loss`
(policy losses). A module registers its functions with `@register(kind, name)`; the trainer looks
them up with `get(kind, name)` from config strings, so an unknown name fails at start-up with the
list of names it could have been.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

KINDS = ("reward", "advantage", "policy_loss")

_Function = TypeVar("_Function", bound=Callable)
_tables: dict[str, dict[str, Callable]] = {kind: {} for kind in KINDS}


def register(kind: str, name: str) -> Callable[[_Function], _Function]:
    """Decorator: file the function under `name` in the `kind` table and return it unchanged.

    A second function under the same name is an error rather than a silent replacement, since
    which one won would then depend on import order.
    """
    table = _table(kind)

    def file_under_name(function: _Function) -> _Function:
        if name in table:
            raise ValueError(f"{kind} {name!r} is already registered (by {table[name].__name__})")
        table[name] = function
        return function

    return file_under_name


def get(kind: str, name: str) -> Callable:
    """The function registered under `name` in the `kind` table."""
    table = _table(kind)
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; known {kind} names: {', '.join(sorted(table))}")
    return table[name]


def names(kind: str) -> tuple[str, ...]:
    """The names registered in the `kind` table, sorted."""
    return tuple(sorted(_table(kind)))


def _table(kind: str) -> dict[str, Callable]:
    if kind not in _tables:
        raise ValueError(f"unknown registry kind {kind!r}; known kinds: {', '.join(KINDS)}")
    return _tables[kind]
