"""`sd` greedy (token-level speculative decoding) as one device loop over a batch of rows, a
request each, on the machinery of the other modes' loops (`window_loop.py`): the same row
state, refill (`batch.py`), target pass and chain end, so that `sd`'s speed measures the
algorithm and not a host round trip per proposal.

A round, per row in play: the draft takes the target's token of the last round (`pending`, in
neither cache yet) and proposes `k` tokens greedily; one target pass over `[pending, proposal]`
gives the target's greedy token after each; the longest prefix of the proposal that agrees is
kept (up to and with an EOS), then the target's own token after it (where they part, or after the
whole proposal); that token is the next round's pending one. Both caches roll back to the kept
tokens. The committed tokens are therefore the target's greedy chain, token for token.

The chain ends where the target alone ends it (`chain_loop.py`): at the first step end at or past
`max_new_tokens`, or at EOS; a round that crosses that point keeps only the tokens before it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from dreamr_jax.models.generate import merge
from dreamr_jax.models.kv_cache import rollback
from dreamr_jax.speculative.runner import feed_rows, until_a_row_finishes
from dreamr_jax.speculative.window_loop import step_boundaries, target_pass


@dataclasses.dataclass(frozen=True)
class SdSpec:
    """The static shape of the loop: proposal length k, step cap, budget, step-ending tokens."""

    k: int
    max_step_tokens: int
    max_new_tokens: int
    stop_ids: tuple[int, ...]
    eos_ids: tuple[int, ...]
    pad_id: int

    @property
    def out_len(self) -> int:
        # A step begins below the budget and is at most max_step_tokens long.
        return self.max_new_tokens + self.max_step_tokens

    def fresh_row(self, t_logits) -> dict:
        """A row's state before its first round, from the target's logits after its prompt
        `[vocab]`: `t_next` is the target's first token, what the first proposed token must
        be. (`window_loop.start_rows` and `admit` build the batch from it.)"""
        zero = jnp.zeros((), jnp.int32)
        return {
            "t_next": jnp.argmax(t_logits).astype(jnp.int32),
            "tokens": jnp.full((self.out_len,), -1, jnp.int32),
            "n": zero,
            "pending": jnp.full((), -1, jnp.int32),
            "in_step": zero,
            "done": jnp.zeros((), bool),
            "passes": zero,
            "proposed": zero,
            "accepted": zero,
        }


def _commit(row, proposal, before, has_p, live, *, spec: SdSpec):
    """One row's round: the proposal `[k]` against the target's choice before each proposed
    token and after the last `before [k + 1]`. Returns the row's new state and how many
    proposed tokens both caches keep."""
    k, index = spec.k, jnp.arange(spec.k + 1)
    eos = jnp.asarray(spec.eos_ids, jnp.int32)
    stop = jnp.asarray(spec.stop_ids + spec.eos_ids, jnp.int32)
    is_eos = jnp.isin(proposal, eos)
    offered = jnp.where(jnp.any(is_eos), jnp.argmax(is_eos) + 1, k)  # nothing after an EOS
    agree = jnp.cumprod(proposal == before[:k]) * (jnp.arange(k) < offered)
    kept = jnp.sum(agree)
    ends_on_eos = (kept > 0) & jnp.isin(proposal[jnp.maximum(kept - 1, 0)], eos)
    extra = before[kept]  # the target's own token after the kept ones
    new = kept + ~ends_on_eos
    padded = jnp.concatenate([proposal, jnp.full((1,), spec.pad_id, jnp.int32)])
    committed = jnp.where(index < kept, padded, jnp.where(index == kept, extra, spec.pad_id))
    real = index < new
    ends_here, run = step_boundaries(committed, row["in_step"], stop, spec.max_step_tokens)
    position = row["n"] + index
    ends_chain = (
        real & ends_here & ((position + 1 >= spec.max_new_tokens) | jnp.isin(committed, eos))
    )
    finished = jnp.any(ends_chain)
    new = jnp.where(finished, jnp.argmax(ends_chain) + 1, new) * live
    last = jnp.maximum(new - 1, 0)
    at = jnp.where(index < new, position, spec.out_len)
    new_row = {
        **row,
        "tokens": row["tokens"].at[at].set(committed, mode="drop"),
        "n": row["n"] + new,
        "pending": jnp.where(live, jnp.where(ends_on_eos, -1, extra), row["pending"]),
        "in_step": jnp.where(
            live, jnp.where(ends_here[last], 0, run[last] % spec.max_step_tokens), row["in_step"]
        ),
        "done": row["done"] | (live & finished),
        "passes": row["passes"] + live,
        "proposed": row["proposed"] + offered * live,
        "accepted": row["accepted"] + kept * live,
    }
    return new_row, kept * live


@functools.partial(jax.jit, static_argnums=(0, 2, 5), donate_argnums=4)
def speculate_tokens(t_graph, t_state, d_graph, d_state, state: dict, spec: SdSpec):
    """Rounds over every row in play (`active` and not `done`) until one of them finishes its
    chain, or none is left in play. `state` (`window_loop.start_rows`, `admit`; donated) holds
    per row the caches and `tokens [out_len]` (the first `n` real), `n`, and the counters
    `passes` (target passes), `proposed` and `accepted` (tokens)."""
    d_model = merge(d_graph, d_state)
    k, width = spec.k, spec.k + 1
    per_row = ("t_cache", "d_cache", "d_logits", "active")
    commit_rows = jax.vmap(functools.partial(_commit, spec=spec))

    def propose(i, carry):
        d_cache, d_logits, proposal, live = carry
        token = jnp.where(live, jnp.argmax(d_logits, axis=-1).astype(jnp.int32), -1)
        d_cache, d_logits = feed_rows(d_model, token, live, d_cache, d_logits)
        return d_cache, d_logits, proposal.at[:, i].set(token), live

    def body(c):
        live = c["active"] & ~c["done"]
        has_p = (c["pending"] >= 0) & live
        d_start, t_start = c["d_cache"], c["t_cache"]
        pending = jnp.maximum(c["pending"], 0)
        d_cache, d_logits = feed_rows(d_model, pending, has_p, d_start, c["d_logits"])
        rows = live.shape[0]
        d_cache, d_logits, proposal, _ = jax.lax.fori_loop(
            0, k, propose, (d_cache, d_logits, jnp.full((rows, k), -1, jnp.int32), live)
        )
        # The chunk: [pending, proposal] where a token is pending, else [proposal, pad].
        with_p = jnp.concatenate([c["pending"][:, None], proposal], axis=1)
        without = jnp.concatenate([proposal, jnp.full((rows, 1), spec.pad_id, jnp.int32)], 1)
        tokens = jnp.where(has_p[:, None], with_p, without)
        mask = live[:, None] & (jnp.arange(width)[None] < k + has_p[:, None])
        offsets = jnp.broadcast_to(jnp.arange(width), (rows, width))
        greedy, _, t_cache = target_pass(
            t_graph, t_state, t_start, tokens, mask, offsets, None, None, width=width
        )
        # The target's choice before each proposed token and after the last.
        choices = jnp.concatenate([c["t_next"][:, None], greedy], axis=1)
        before = jax.vmap(lambda row, p: jax.lax.dynamic_slice(row, (p,), (width,)))(
            choices, has_p.astype(jnp.int32)
        )
        state = {name: value for name, value in c.items() if name not in per_row}
        state, kept = commit_rows(state, proposal, before, has_p, live)
        keep = has_p + kept
        t_cache = rollback(t_cache, t_start.length + keep, t_start.next_position + keep)
        d_cache = rollback(d_cache, d_start.length + keep, d_start.next_position + keep)
        # The draft's logits stay those after the whole proposal: every row still in play has a
        # pending token, which the next round feeds first, and that replaces them.
        return {
            **state,
            "t_cache": t_cache,
            "d_cache": d_cache,
            "d_logits": d_logits,
            "active": c["active"],
        }

    return jax.lax.while_loop(until_a_row_finishes, body, state)
