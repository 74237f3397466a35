"""The decoding modes, one module each, filed by name (DESIGN.md section 2).

A mode is a function `(engine, inputs, max_len) -> Solution` that answers one prompt with the
engine's models and shared pieces (`Engine`: sessions, drafting, verification, commit and
rollback), with the traits the engine asks of it (`Mode`): the cache slots it needs past the
chain, and, where it runs as a device loop, the lanes that batch its requests (`batch.py`).
`Engine` looks the mode up by `spec.mode`; importing this package files every mode.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dreamr_jax.config.schema import SpecConfig
    from dreamr_jax.speculative.engine import Engine
    from dreamr_jax.speculative.records import Solution


@dataclasses.dataclass(frozen=True)
class Mode:
    """run: `(engine, inputs, max_len) -> Solution`; room: `engine -> int`, the cache slots the
    mode writes after the chain (judge suffixes, bonus steps, proposals); lanes: `engine ->
    Lanes | None`, the mode's device loop over a batch of rows (None: a host loop, one request
    at a time); resumes: `spec -> bool`, whether a rejection leaves the rest of the target's
    step to the draft; branches: `spec -> int`, how many target steps the host loop decodes
    side by side after a verification pass (`Verification.target_steps`: eager fallback,
    lookahead), writing over the judge suffixes; stops_on_doubt: whether a draft window ends
    after a doubtful step (`spec.draft_confidence`); warms_host_loop: whether `Engine.warm_up`
    compiles the host loop's verification and fallback programs, which one solve may not
    reach."""

    run: Callable[[Engine, object, int], Solution]
    room: Callable[[Engine], int] = lambda engine: 0
    lanes: Callable[[Engine], object] | None = None
    resumes: Callable[[SpecConfig], bool] = lambda spec: False
    branches: Callable[[SpecConfig], int] = lambda spec: 0
    stops_on_doubt: bool = False
    warms_host_loop: bool = False


_modes: dict[str, Mode] = {}


def register(name: str, **traits):
    """Decorator: file a mode's run function under `name` with its `Mode` traits (a second one
    is an error)."""

    def file_under_name(run):
        if name in _modes:
            raise ValueError(f"mode {name!r} is already registered (by {_modes[name].run})")
        _modes[name] = Mode(run, **traits)
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
