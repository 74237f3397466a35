"""`exact`: draft W steps, the target keeps the longest prefix of them that equals its own greedy
tokens, then its own token where they part, and asks no judge: exactly the target's greedy chain
(greedy only), as one device loop (`window_loop.py`). A lossless baseline, not DREAM-R."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dreamr_jax.speculative.batch import WindowLanes, solve_one
from dreamr_jax.speculative.modes import register
from dreamr_jax.speculative.records import Solution

if TYPE_CHECKING:
    from dreamr_jax.speculative.engine import Engine


@register("exact", lanes=lambda engine: WindowLanes(engine, judged=False))
def exact(engine: Engine, inputs, max_len: int) -> Solution:
    return solve_one(engine, inputs, max_len)
