"""dreamr at alpha >= 1, greedy, as one device loop: draft a window, verify it, commit, roll both
caches back, repeat, with no host round trip until the chain is done.

At alpha >= 1 the judge accepts nothing, so what is committed is exactly the target's greedy
chain: every drafted token the target would have written itself (read off the verification
pass), then the target's own token where they part, which the draft's next window continues
from (the `resume` fallback). The host loop (`Engine._dreamr`) does the same with two host reads
a window; the target alone runs its whole chain in one device call, and the host round trips cost
this CPU ~1.5 ms each, so the exact mode gets the same treatment.

Verification widths are dynamic (the drafted chain's length is known only on the device), so the
pass is a `lax.switch` over the padded widths `chunk_width` allows: one program, and each window
pays only for its own width. (XLA copies the target's cache into the branch taken, two 1.2 MB
copies a window for the DigitMath target; the two ways around it measured so far were slower,
docs/benchmarks.md.)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from dreamr_jax.models.generate import merge
from dreamr_jax.models.kv_cache import KVCache, rollback
from dreamr_jax.models.sampling import GREEDY
from dreamr_jax.spec.runner import chunk_width, extend, feed_token, generate_steps


@dataclasses.dataclass(frozen=True)
class ExactSpec:
    """The static shape of the loop: window W, step cap, budget, and the step-ending tokens."""

    window: int
    max_step_tokens: int
    max_new_tokens: int
    stop_ids: tuple[int, ...]
    eos_ids: tuple[int, ...]
    pad_id: int

    @property
    def chain(self) -> int:
        """Most chain tokens a window verifies: a pending token and W + 1 drafted steps."""
        return 1 + (self.window + 1) * self.max_step_tokens

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(sorted({chunk_width(n) for n in range(1, self.chain + 1)}))

    @property
    def out_len(self) -> int:
        # The loop stops at the first step end past the budget; a window commits at most a chain.
        return self.max_new_tokens + self.max_step_tokens + self.chain


def _verify(graphdef, state, chunk, length, cache: KVCache, width: int):
    """The first `width` tokens of `chunk [1, widest]` (`length` of them real) into the target's
    cache (`runner.extend`, which keeps the real ones). Returns its greedy token after each chunk
    token `[widest]` (padded with -1) and the cache."""
    tokens = chunk[:, :width]
    mask = (jnp.arange(width) < length)[None]
    gather = jnp.arange(width)[None]
    # The logits "before" the chunk only stand in for an empty row; the chunk never is one.
    unused = jnp.zeros((1, 1), jnp.float32)
    logits, cache, _ = extend(graphdef, state, tokens, mask, cache, gather, unused)
    greedy = jnp.argmax(logits[0], axis=-1).astype(jnp.int32)
    return jnp.pad(greedy, (0, chunk.shape[1] - width), constant_values=-1), cache


def _step_ends(tokens, in_step, stop, cap: int):
    """Where the steps of a run of committed tokens `[n]` end (a stop token, or `cap` tokens since
    the last end), given `in_step` tokens of the current step before them; and the count after
    them. Matches `generate_steps`, so the chain is cut where the target alone cuts it."""
    n = tokens.shape[0]
    index = jnp.arange(n)
    is_stop = jnp.isin(tokens, stop)
    last_stop = jax.lax.cummax(jnp.where(is_stop, index, -1))  # through each token
    before = jnp.concatenate([jnp.array([-1]), last_stop[:-1]])  # strictly before it
    run = jnp.where(before >= 0, index - before, in_step + index + 1)
    ends = is_stop | (run % cap == 0)
    return ends, run


@functools.partial(jax.jit, static_argnums=(0, 2, 8))
def speculate_exact(
    t_graph,
    t_state,
    d_graph,
    d_state,
    t_cache: KVCache,
    d_cache: KVCache,
    t_logits,
    d_logits,
    spec: ExactSpec,
    min_confidence,
):
    """The whole chain of one request (batch 1). t_logits, d_logits: `[1, vocab]` after each
    model's prompt. Returns the committed tokens `[out_len]` (the first n real), n, the number of
    verification passes and the number of drafted steps."""
    d_model = merge(d_graph, d_state)
    widths = spec.widths
    widest = widths[-1]
    stop = jnp.asarray(spec.stop_ids + spec.eos_ids, jnp.int32)
    eos = jnp.asarray(spec.eos_ids, jnp.int32)
    budget, cap = spec.max_new_tokens, spec.max_step_tokens
    key = jax.random.key(0)  # greedy: never drawn from
    branches = [functools.partial(_verify, t_graph, t_state, width=w) for w in widths]

    def cond(carry):
        return ~carry["done"]

    def body(c):
        has_p = c["pending"] >= 0
        # The draft takes the target's token that ended the last window (nothing if none).
        d_cache, d_logits = c["d_cache"], c["d_logits"]
        d_start = d_cache.length
        fed, d_logits = feed_token(
            d_model, jnp.maximum(c["pending"], 0)[None], has_p[None], d_cache, d_logits
        )
        d_cache = rollback(fed, d_start + has_p, fed.next_position)
        drafted, ends, count, _, d_cache, d_after = generate_steps(
            d_graph,
            d_state,
            d_logits,
            d_cache,
            key,
            (budget - c["n"])[None],
            spec.window + 1,
            cap,
            GREEDY,
            spec.stop_ids,
            spec.eos_ids,
            min_confidence,
            spec.window + has_p,  # with a pending token, the first step finishes the target's
            keep_marks=False,  # rollbacks here go to any token, from the verification
        )
        n_drafted = jnp.max(ends[0])
        length = n_drafted + has_p
        # The chain: the pending token, then the drafted tokens; padding after it.
        index = jnp.arange(widest)
        shifted = jnp.concatenate([c["pending"][None], drafted[0]])
        plain = jnp.concatenate([drafted[0], jnp.full((1,), -1, jnp.int32)])
        chain = jnp.pad(jnp.where(has_p, shifted, plain), (0, widest - spec.chain))
        chain = jnp.where(index < length, chain, spec.pad_id)
        bucket = jnp.sum(jnp.asarray(widths) < length)
        greedy_after, t_cache = jax.lax.switch(bucket, branches, chain[None], length, c["t_cache"])
        # The target's choice before each chain token: after the previous one, or for the first
        # after the last window.
        before = jnp.concatenate([c["t_next"][None], greedy_after[:-1]])
        wrong = (index >= has_p) & (index < length) & (chain != before)
        m = jnp.where(jnp.any(wrong), jnp.argmax(wrong), length)  # chain[:m] is committed
        parted = m < length
        own = before[m]  # the target's token where it parts from the draft
        committed = jnp.where(index < m, chain, own)
        keep = (index >= has_p) & ((index < m) | ((index == m) & parted))
        new = jnp.sum(keep)
        # Compact the kept tokens to the front (they are contiguous from has_p).
        order = jnp.clip(index + has_p, 0, widest - 1)
        kept = jnp.where(index < new, committed[order], spec.pad_id)
        step_end, run = _step_ends(kept, c["in_step"], stop, cap)
        real = index < new
        position = c["n"] + index  # of each kept token in the chain
        final = real & step_end & ((position + 1 >= budget) | jnp.isin(kept, eos))
        done = jnp.any(final)
        n_new = jnp.where(done, c["n"] + jnp.argmax(final) + 1, c["n"] + new)
        out = c["out"].at[jnp.where(real, position, spec.out_len)].set(kept, mode="drop")
        last = jnp.maximum(new - 1, 0)
        in_step = jnp.where(step_end[last], 0, run[last] % cap)
        # Both caches back to the committed chain (the pending token is in neither yet).
        t_cache = rollback(t_cache, c["t_cache"].length + m, c["t_cache"].next_position + m)
        drop = n_drafted - (m - has_p)
        d_cache = rollback(d_cache, d_cache.length - drop, d_cache.next_position - drop)
        return {
            "t_cache": t_cache,
            "d_cache": d_cache,
            "t_next": greedy_after[length - 1],  # read only when no token is pending
            "d_logits": d_after,
            "out": out,
            "n": n_new,
            "pending": jnp.where(parted, own, -1),
            "in_step": jnp.where(new > 0, in_step, c["in_step"]),
            "done": done | (c["passes"] + 1 >= budget + cap),
            "passes": c["passes"] + 1,
            "proposed": c["proposed"] + count[0],
        }

    zero = jnp.zeros((), jnp.int32)
    carry = {
        "t_cache": t_cache,
        "d_cache": d_cache,
        "t_next": jnp.argmax(t_logits[0]).astype(jnp.int32),
        "d_logits": d_logits,
        "out": jnp.full((spec.out_len,), -1, jnp.int32),
        "n": zero,
        "pending": jnp.full((), -1, jnp.int32),
        "in_step": zero,
        "done": jnp.zeros((), bool),
        "passes": zero,
        "proposed": zero,
    }
    c = jax.lax.while_loop(cond, body, carry)
    return c["out"], c["n"], c["passes"], c["proposed"]
