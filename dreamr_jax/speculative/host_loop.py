"""`dreamr` (and `exact`) window by window from the host, a device call per draft window and per
verification: every fallback, sampling, the three schedules (`spec.schedule`), and draft and
target on devices of their own (`parallel.*`), where one device program cannot hold both.

Each window: the draft writes up to W steps; one tree-shaped target pass checks them all (CPN
verdicts for `dreamr`, none for `exact`) and gives the target's greedy token after every chain
token; the steps are taken in order: one the judge accepts is committed as the draft's, one that
is word for word the target's own step as the target's, and at the first other one the target
takes over (`lazy`: its step computed then; `eager`: computed for every position alongside the
checks; `resume`, greedy: only up to its first token that differs, the draft writing the rest).

Schedules: `window` (Lookahead's, synchronous: the next window is drafted once this one is
decided), `sequential` (SpecReason's: one step a window), and `fpsr`: the draft's next window is
dispatched, as if every step of this one is kept, before the host waits for this one's verdicts,
so on devices of its own the draft writes it while the target verifies (and, `eager`, writes its
own steps); when a step is not kept, that window is dropped. The decisions are the `window`
schedule's: drafting ahead changes when the draft works, not what it writes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from dreamr_jax.speculative.records import Solution, StepRecord
from dreamr_jax.speculative.runner import Session, take_branch

if TYPE_CHECKING:
    from dreamr_jax.speculative.engine import Engine


def host_loop(engine: Engine, t: Session, d: Session) -> Solution:
    """The chain of one request from the target's and the draft's sessions after its prompt."""
    sol = Solution([], [])
    spec = engine.spec
    judged = spec.mode == "dreamr"
    eager = judged and spec.fallback == "eager"
    window = 1 if spec.schedule == "sequential" else spec.window
    ahead = None  # the next window, dispatched before this one's verdicts were read (fpsr)
    pending = None  # the last token of a `resume` fallback, not yet in the target's cache
    # A pending token leaves its step open: the chain goes on to that step's end.
    while pending is not None or not engine.done(sol.tokens):
        open_step = engine.open_step(sol.tokens) if pending is not None else 0
        limit = window + (open_step > 0)
        if ahead is None:
            steps, marks, d = engine.draft_window(d, sol, limit, open_step)
        else:  # drafted while the last window was checked, from where its steps end
            (steps, marks, d), ahead = engine.draft.read_steps(ahead), None
        k = len(steps)
        suffix = None if judged else ()  # `exact` asks no judge
        v, pending = engine.verify(t, steps, suffix, pending=pending), None
        sol.target_calls += 1
        if eager:  # the target's step at every position, dispatched before any verdict
            # (always W branches, so one program serves every window)
            fallback = v.target_steps(
                engine.target,
                engine.rows(range(k), spec.window),
                engine.key(len(sol.tokens) + 1),
                spec.max_step_tokens,
                engine.sampling,
            )
            sol.target_calls += 1
        chain = sol.tokens + [token for step in steps for token in step]
        if spec.schedule == "fpsr" and not engine.done(chain):
            ahead = engine.dispatch_window(d, len(chain), window)
        if judged:
            verdicts = engine.cpn(v.verdict_logits)
            ok, p = verdicts.accept[:k], verdicts.p[:k].tolist()
            sol.format_misses += int(np.sum(~verdicts.format_ok[:k]))
        else:
            ok, p = np.zeros(k, bool), [None] * k
        sol.proposed += k
        kept = 0
        while kept < k:
            step = steps[kept]
            if ok[kept]:
                sol.accepted += 1
                engine.commit(sol, step, "draft", p=p[kept], accepted=True)
            else:
                # A refused step that is word for word the target's own step there is what
                # the fallback would commit; the later steps were drafted and judged after
                # exactly it, so the window goes on. (`exact` records only the steps it drops.)
                own = engine.is_own_step(v, steps, kept)
                if judged or not own:
                    text = engine.decode(step)
                    sol.steps.append(StepRecord(text, "draft", step, p[kept], False, False))
                if not own:
                    break
                engine.commit(sol, step, "target")
            kept += 1
        if kept == k:
            t = v.at([k])
            continue
        if ahead is not None:  # drafted after steps that were not kept
            d, ahead = engine.undo_window(ahead), None
        if not eager:
            in_step = open_step if kept == 0 else 0
            t, d, pending = engine.target_takes_over(sol, v, d, steps, marks, kept, in_step)
            continue
        tokens, n, branches, logits = fallback
        new_step = engine.take(tokens, n, kept)
        t = take_branch(branches, logits, kept, len(new_step), spec.max_step_tokens)
        engine.commit(sol, new_step, "target")
        d = engine.resync_draft(d, steps, marks, kept, new_step)
    return sol
