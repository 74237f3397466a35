"""`target` and `draft`: one model alone, step by step (the baselines every speedup is against),
as one device loop over the whole chain (`chain_loop.py`) that batches requests like the
speculative modes' loop does. Step by step, with a host round trip after each, the target alone
was ~7% slower: the baseline every speedup is measured against must not carry that."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dreamr_jax.speculative.batch import ChainLanes, solve_one
from dreamr_jax.speculative.modes import register
from dreamr_jax.speculative.records import Solution

if TYPE_CHECKING:
    from dreamr_jax.speculative.engine import Engine


@register("target", lanes=lambda engine: ChainLanes(engine, "target"))
def target(engine: Engine, inputs, max_len: int) -> Solution:
    return solve_one(engine, inputs, max_len)


@register("draft", lanes=lambda engine: ChainLanes(engine, "draft"))
def draft(engine: Engine, inputs, max_len: int) -> Solution:
    return solve_one(engine, inputs, max_len)
