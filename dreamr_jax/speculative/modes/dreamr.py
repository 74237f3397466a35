"""`dreamr`: DREAM-R's CPN + FPSR. Draft W steps, verify all W with one batched CPN pass, commit up
to the first rejection and the target's step there (computed after the rejection with `lazy`, or
for every position alongside the checks with `eager`), roll both caches back, next window.
Greedy, `resume` commits the target's step only up to its first token that differs from the
rejected step's; the draft's next window starts by finishing that step. Greedy `resume` (the
default) runs as one device loop (`window_loop.py`); the other fallbacks, sampling, the other
schedules and models on devices of their own run the host loop (`host_loop.py`). The judge is
asked at every alpha: at alpha >= 1 it never accepts, so the output is the target's, at the
judge's cost (the judge-free path is `exact`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dreamr_jax.speculative.batch import WindowLanes, solve_one
from dreamr_jax.speculative.host_loop import host_loop
from dreamr_jax.speculative.modes import register
from dreamr_jax.speculative.records import Solution

if TYPE_CHECKING:
    from dreamr_jax.speculative.engine import Engine


def _judge_room(engine: Engine) -> int:
    """The judge suffix of every step a verification pass can hold."""
    return engine.most_steps * len(engine.builder.judge_suffix_ids)


def _lanes(engine: Engine) -> WindowLanes | None:
    return WindowLanes(engine, judged=True) if engine.device_loop else None


@register(
    "dreamr",
    room=_judge_room,
    lanes=_lanes,
    resumes=lambda spec: spec.fallback == "resume",
    branches=lambda spec: spec.window if spec.fallback == "eager" else 0,
    stops_on_doubt=True,
    warms_host_loop=True,
)
def dreamr(engine: Engine, inputs, max_len: int) -> Solution:
    if engine.device_loop:
        return solve_one(engine, inputs, max_len)
    return host_loop(engine, *engine.start(inputs, max_len))
