"""The decoding modes, one module each, filed by name (DESIGN.md section 2).

A mode is a function `(engine, inputs, max_len) -> Solution` that answers one prompt with the
engine's models and shared pieces (`Engine`: sessions, drafting, verification, commit and
rollback), the cache slots it needs past the chain (`room`), and, where it runs as a device
loop, the lanes that batch its requests (`lanes`, `batch.py`). `Engine` looks the mode up by
`spec.mode`; importing this package files every mode.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dreamr_jax.speculative.engine import Engine
    from dreamr_jax.speculative.records import Solution


@dataclasses.dataclass(frozen=True)
class Mode:
    """run: `(engine, inputs, max_len) -> Solution`; room: `engine -> int`, the cache slots the
    mode writes after the chain (judge suffixes, bonus steps, proposals); lanes: `engine ->
    Lanes | None`, the mode's device loop over a batch of rows (None: a host loop, one request
    at a time)."""

    run: Callable[[Engine, object, int], Solution]
    room: Callable[[Engine], int]
    lanes: Callable[[Engine], object] | None = None


_modes: dict[str, Mode] = {}


def register(
    name: str,
    room: Callable[[Engine], int] = lambda engine: 0,
    lanes: Callable[[Engine], object] | None = None,
):
    """Decorator: file a mode's run function under `name` (a second one is an error)."""

    def file_under_name(run):
        if name in _modes:
            raise ValueError(f"mode {name!r} is already registered (by {_modes[name].run})")
        _modes[name] = Mode(run, room, lanes)
        return run

    return file_under_name


def get(name: str) -> Mode:
    if name not in _modes:
        raise ValueError(f"unknown mode {name!r}; known modes: {', '.join(sorted(_modes))}")
    return _modes[name]


def names() -> tuple[str, ...]:
    return tuple(sorted(_modes))


# Imported for their registrations, after `register` exists.
from dreamr_jax.speculative.modes import (  # noqa: E402, F401
    alone,
    dreamr,
    exact,
    lookahead,
    sd,
    specreason,
)
