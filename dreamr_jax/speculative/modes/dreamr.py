"""`dreamr`: DREAM-R's CPN + FPSR. Draft W steps, verify all W with one batched CPN pass, commit up
to the first rejection and the target's step there (computed after the rejection with `lazy`, or
for every position alongside the checks with `eager`), roll both caches back, next window.
Greedy, `resume` commits the target's step only up to its first token that differs from the
rejected step's; the draft's next window starts by finishing that step. Greedy `resume` (the
default) runs as one device loop (`window_loop.py`); the other fallbacks, and sampling, as a host
loop. The judge is asked at every alpha: at alpha >= 1 it never accepts, so the output is the
target's, at the judge's cost (the judge-free path is `exact`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from dreamr_jax.speculative.batch import WindowLanes, solve_one
from dreamr_jax.speculative.modes import register
from dreamr_jax.speculative.records import Solution, StepRecord
from dreamr_jax.speculative.runner import Session, select_rows

if TYPE_CHECKING:
    from dreamr_jax.speculative.engine import Engine


def _judge_room(engine: Engine) -> int:
    """The judge suffix of every step a verification pass can hold."""
    return engine.most_steps * len(engine.builder.judge_suffix_ids)


def _lanes(engine: Engine) -> WindowLanes | None:
    return WindowLanes(engine, judged=True) if engine.device_loop else None


@register("dreamr", room=_judge_room, lanes=_lanes)
def dreamr(engine: Engine, inputs, max_len: int) -> Solution:
    if engine.device_loop:
        return solve_one(engine, inputs, max_len)
    return _host_loop(engine, *engine.start(inputs, max_len))


def _host_loop(engine: Engine, t: Session, d: Session) -> Solution:
    """dreamr window by window, a device call per draft window and per verification: every
    fallback, and sampling. Greedy `resume` runs as one device loop instead (`window_loop.py`),
    tested to take the same decisions."""
    sol = Solution([], [])
    eager = engine.spec.fallback == "eager"
    pending = None  # the last token of a `resume` fallback, not yet in the target's cache
    # A pending token leaves its step open: the chain goes on to that step's end.
    while pending is not None or not engine.done(sol.tokens):
        open_step = engine.open_step(sol.tokens) if pending is not None else 0
        limit = engine.spec.window + (open_step > 0)
        steps, marks, d = engine.draft_window(d, sol, limit, open_step)
        k = len(steps)
        v, pending = engine.verify(t, steps, pending=pending), None
        sol.target_calls += 1
        if eager:  # the target's step at every position, dispatched before any verdict
            # (always W rows, so one program serves every window)
            fallback = engine.target.step(
                v.at(engine.rows(range(k), engine.spec.window)),
                engine.key(len(sol.tokens) + 1),
                engine.spec.max_step_tokens,
                engine.sampling,
            )
            sol.target_calls += 1
        verdicts = engine.cpn(v.verdict_logits)
        ok, p = verdicts.accept[:k], verdicts.p[:k].tolist()
        sol.format_misses += int(np.sum(~verdicts.format_ok[:k]))
        sol.proposed += k
        kept = 0
        while kept < k:
            step = steps[kept]
            if ok[kept]:
                sol.accepted += 1
                engine.commit(sol, step, "draft", p=p[kept], accepted=True)
            else:
                text = engine.decode(step)
                sol.steps.append(StepRecord(text, "draft", step, p[kept], False, False))
                # A rejected step that is word for word the target's own step there is
                # what the fallback would commit; the later steps were drafted and judged
                # after exactly it, so the window goes on.
                if not engine.is_own_step(v, steps, kept):
                    break
                engine.commit(sol, step, "target")
            kept += 1
        if kept == k:
            t = v.at([k])
            continue
        if not eager:
            in_step = open_step if kept == 0 else 0
            t, d, pending = engine.target_takes_over(sol, v, d, steps, marks, kept, in_step)
            continue
        tokens, n, _, _, batch = fallback
        new_step = engine.take(tokens, n, kept)
        t = select_rows(batch, [kept])
        engine.commit(sol, new_step, "target")
        d = engine.resync_draft(d, steps, marks, kept, new_step)
    return sol
