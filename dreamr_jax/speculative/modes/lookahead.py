"""`lookahead` (Lookahead Reasoning's synchronous window): draft W steps, the target writes its own
step at all W + 1 positions in one batched pass; accept while equal (after whitespace
normalisation), else while the target's CPN judge accepts the draft step; the target's step
replaces the first rejected one (or is a bonus step after the window)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dreamr_jax.speculative.modes import register
from dreamr_jax.speculative.records import Solution, StepRecord
from dreamr_jax.speculative.runner import take_branch

if TYPE_CHECKING:
    from dreamr_jax.speculative.engine import Engine


def _window_room(engine: Engine) -> int:
    """The judge suffixes of a window."""
    return engine.spec.window * len(engine.builder.judge_suffix_ids)


@register(
    "lookahead",
    room=_window_room,
    branches=lambda spec: spec.window + 1,
    warms_host_loop=True,
)
def lookahead(engine: Engine, inputs, max_len: int) -> Solution:
    t, d = engine.start(inputs, max_len)
    sol = Solution([], [])
    while not engine.done(sol.tokens):
        steps, marks, d = engine.draft_window(d, sol, engine.spec.window)
        if not steps:
            break
        k = len(steps)
        # One pass over the drafted chain (with the judge queries, used on a mismatch), then
        # the target writes its own step after every prefix of it, as k + 1 batched rows.
        v = engine.verify(t, steps)
        tokens, n, branches, logits = v.target_steps(
            engine.target,
            engine.rows(range(k + 1), engine.spec.window + 1),
            engine.key(len(sol.tokens) + 1),
            engine.spec.max_step_tokens,
            engine.sampling,
        )
        sol.target_calls += 2
        target_steps = [engine.take(tokens, n, i) for i in range(k + 1)]
        verdicts = None
        kept = 0
        for i, step in enumerate(steps):
            same = engine.decode(step).strip() == engine.decode(target_steps[i]).strip()
            p = None
            if not same:  # not the same words: the target judges whether the step holds
                verdicts = verdicts or engine.cpn(v.verdict_logits)
                p = float(verdicts.p[i])
                same = bool(verdicts.accept[i])
            sol.proposed += 1
            if not same:
                sol.steps.append(StepRecord(engine.decode(step), "draft", step, p, False, False))
                break
            kept += 1
            sol.accepted += 1
            engine.commit(sol, step, "draft", p=p, accepted=True)
            if step[-1] in engine.eos:
                break
        if sol.tokens and sol.tokens[-1] in engine.eos:
            break
        new_step = target_steps[kept]
        engine.commit(sol, new_step, "target")
        t = take_branch(branches, logits, kept, len(new_step), engine.spec.max_step_tokens)
        d = engine.resync_draft(d, steps, marks, kept, new_step)
    return sol
