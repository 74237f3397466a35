"""`target` and `draft`: one model alone, step by step (the baselines every speedup is against)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dreamr_jax.speculative.modes import register
from dreamr_jax.speculative.records import Solution

if TYPE_CHECKING:
    from dreamr_jax.speculative.engine import Engine


def _alone(engine: Engine, author: str, inputs, max_len: int) -> Solution:
    """The whole chain in one device loop (`generate_steps` with a window as long as the
    budget), cut into steps as the other modes cut theirs. Step by step, with a host round
    trip after each, the target alone was ~7% slower: the baseline every speedup is
    measured against must not carry that."""
    runner = engine.target if author == "target" else engine.draft
    session = runner.start(inputs, max_len)
    budget = engine.spec.max_new_tokens  # steps have at least one token: at most this many
    steps, _, _ = runner.steps(
        session,
        engine.key(0),
        budget,
        budget,
        engine.spec.max_step_tokens,
        engine.sampling,
        keep_marks=False,  # nothing to roll back to
    )
    sol = Solution([], [], target_calls=int(author == "target"))
    for step in steps:
        engine.commit(sol, step, author)
    return sol


@register("target")
def target(engine: Engine, inputs, max_len: int) -> Solution:
    return _alone(engine, "target", inputs, max_len)


@register("draft")
def draft(engine: Engine, inputs, max_len: int) -> Solution:
    return _alone(engine, "draft", inputs, max_len)
