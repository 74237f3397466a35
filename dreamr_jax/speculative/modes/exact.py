"""`exact`: draft W steps, the target keeps the longest prefix of them that equals its own greedy
tokens, then its own token where they part, and asks no judge: exactly the target's greedy chain
(greedy only), as one device loop (`window_loop.py`), or where that cannot run (another
schedule, draft and target on devices of their own) as the host loop (`host_loop.py`). A
lossless baseline, not DREAM-R."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dreamr_jax.speculative.batch import WindowLanes, solve_one
from dreamr_jax.speculative.host_loop import host_loop
from dreamr_jax.speculative.modes import register
from dreamr_jax.speculative.records import Solution

if TYPE_CHECKING:
    from dreamr_jax.speculative.engine import Engine


def _lanes(engine: Engine) -> WindowLanes | None:
    return WindowLanes(engine, judged=False) if engine.device_loop else None


@register("exact", lanes=_lanes, resumes=lambda spec: True, stops_on_doubt=True)
def exact(engine: Engine, inputs, max_len: int) -> Solution:
    if engine.device_loop:
        return solve_one(engine, inputs, max_len)
    return host_loop(engine, *engine.start(inputs, max_len))
