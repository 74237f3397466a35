"""`sd`: token-level speculative decoding, the peer that is lossless by construction. Greedy:
accept while the target's argmax agrees; sampling: Leviathan et al.'s acceptance min(1, p/q) with
the residual distribution; `spec.sd_tokens` tokens a proposal. Greedy, on devices the two models
share, it runs as one device loop over a batch of rows (`sd_loop.py`), as the other modes' loops
do; sampling, or draft and target on devices of their own, run the host loop below."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from dreamr_jax.models.sampling import Sampling, filter_logits
from dreamr_jax.speculative.batch import SdLanes, solve_one
from dreamr_jax.speculative.modes import register
from dreamr_jax.speculative.records import Solution
from dreamr_jax.speculative.runner import truncate

if TYPE_CHECKING:
    from dreamr_jax.speculative.engine import Engine


@functools.partial(jax.jit, static_argnums=2)
def sd_target_view(first, logits, sampling: Sampling):
    """The target's view of an sd proposal, in one program: its argmax `[rows]` and, when
    sampling, its distribution `[rows, vocab]` before each proposed token and after the last.
    logits: `[1, size, vocab]` at every chunk position; first: `[1, vocab]`, the logits before
    the chunk when it starts with the proposal, or None when it starts with the pending token
    (whose own logits were read the round before)."""
    table = logits[0] if first is None else jnp.concatenate([first, logits[0]])
    probs = None
    if not sampling.greedy:
        probs = jax.nn.softmax(filter_logits(table, sampling), axis=-1)
    return jnp.argmax(table, axis=-1), probs


def sd_accept(proposal, preds, probs, draft_log_probs, rng) -> tuple[int, int]:
    """How many proposed tokens the target keeps, and the token it adds after them.

    preds, probs: the target's argmax `[>= k + 1]` and, when sampling (else None), its
    distribution `[>= k + 1, vocab]` before each proposed token and after the last
    (`sd_target_view`); draft_log_probs: `[1, >= k, vocab]`, the draft's distributions.
    Greedy: keep while the argmax agrees, then the argmax. Sampling (Leviathan et al.): keep
    token x with probability min(1, p(x) / q(x)), else draw from max(p - q, 0) renormalised; the
    emitted tokens are then distributed exactly as the target's own samples.
    """
    if probs is None:
        preds = np.asarray(preds)
        kept = 0
        while kept < len(proposal) and proposal[kept] == preds[kept]:
            kept += 1
        return kept, int(preds[kept])
    probs = np.asarray(probs, np.float64)
    q = np.exp(np.asarray(draft_log_probs, np.float64)[0])
    for i, token in enumerate(proposal):
        if rng.random() < min(1.0, probs[i, token] / max(q[i, token], 1e-20)):
            continue
        residual = np.maximum(probs[i] - q[i], 0)
        residual = residual / residual.sum() if residual.sum() > 0 else probs[i] / probs[i].sum()
        return i, int(rng.choice(len(residual), p=residual))
    last = probs[len(proposal)]
    return len(proposal), int(rng.choice(len(last), p=last / last.sum()))


def _proposal_room(engine: Engine) -> int:
    """A proposal (and the pending token) past the chain, beyond a step's room."""
    s = engine.spec
    return max(0, s.sd_tokens + 1 - s.max_step_tokens)


def _lanes(engine: Engine) -> SdLanes | None:
    return SdLanes(engine) if engine.device_loop else None


@register("sd", room=_proposal_room, lanes=_lanes)
def sd(engine: Engine, inputs, max_len: int) -> Solution:
    if engine.device_loop:
        return solve_one(engine, inputs, max_len)
    t, d = engine.start(inputs, max_len)
    sol = Solution([], [])
    rng = np.random.default_rng(engine.seed)
    pending = None  # the target's own token of the last round, in neither cache yet
    while (end := engine.chain_end(sol.tokens)) is None:
        if pending is not None:
            _, d = engine.draft.extend(d, [[pending]], [[0]])
        tokens, n, draft_dists, d = engine.draft.step(
            d,
            engine.key(len(sol.tokens)),
            engine.spec.sd_tokens,
            engine.sampling,
            stop=False,
            keep_dists=True,
        )
        proposal = engine.take(tokens, n)
        k = len(proposal)
        # The pending token and the proposal go to the target in one chunk; its logits
        # before each proposed token and after the last are `[k + 1, vocab]`. Gathers are
        # padded to sd_tokens + 1 and chunks to its width: one compiled shape per kind.
        size = engine.spec.sd_tokens + 1
        first = t.logits if pending is None else None
        chunk = proposal if pending is None else [pending, *proposal]
        logits, t = engine.target.extend(t, [chunk], [list(range(size))], size)
        preds, probs = sd_target_view(first, logits, engine.sampling)
        sol.target_calls += 1
        sol.proposed += k
        kept, extra = sd_accept(proposal, preds, probs, draft_dists, rng)
        sol.accepted += kept
        committed = proposal[:kept]
        if kept < k or proposal[-1] not in engine.eos:
            committed = committed + [extra]
        sol.tokens += committed
        # Both caches back to the accepted tokens; `extra` goes in with the next round.
        if kept < k:
            t = truncate(t, k - kept, t.logits)
            d = truncate(d, k - kept, draft_dists[:, kept])
        pending = extra
    sol.tokens = sol.tokens[:end]  # a round may go past the chain's end
    sol.steps = engine.split_steps(sol.tokens)
    return sol
