"""`specreason` (SpecReason's schedule): draft one step, the target rates it 0-9 in one token,
keep it if the score reaches `spec.score_threshold`, else the target writes the step."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from dreamr_jax.speculative.modes import register
from dreamr_jax.speculative.records import Solution, StepRecord

if TYPE_CHECKING:
    from dreamr_jax.speculative.engine import Engine


def _score_room(engine: Engine) -> int:
    return len(engine.builder.score_suffix_ids)


@register("specreason", room=_score_room, warms_host_loop=True)
def specreason(engine: Engine, inputs, max_len: int) -> Solution:
    t, d = engine.start(inputs, max_len)
    sol = Solution([], [])
    score_ids = np.asarray(engine.builder.score_ids)
    while not engine.done(sol.tokens):
        steps, marks, d = engine.draft_window(d, sol, 1)
        if not steps:
            break
        step = steps[0]
        v = engine.verify(t, steps, engine.builder.score_suffix_ids)
        sol.target_calls += 1
        # (Read whole: indexing on the device would run two small programs per step.)
        score = int(np.argmax(np.asarray(v.verdict_logits)[0, score_ids]))
        sol.proposed += 1
        if score >= engine.spec.score_threshold:
            sol.accepted += 1
            engine.commit(sol, step, "draft", p=score / 9, accepted=True)
            t = v.at([1])
            continue
        sol.steps.append(StepRecord(engine.decode(step), "draft", step, score / 9, False, False))
        t, d, _ = engine.target_takes_over(sol, v, d, steps, marks, 0)
    return sol
