"""`exact`, and `dreamr` greedy with the `resume` fallback, as one device loop: draft a window,
verify it in one target pass, commit, roll both caches back, repeat, with no host round trip
until the chain is done.

A window: the draft writes up to W steps (W + 1 when the committed chain ends inside a step: the
first one finishes it) after the token the target committed last, which is in neither cache yet
(`pending`) and is fed first. One target pass over that chain gives the target's greedy token
after every chain token and, for `dreamr`, the CPN verdict on every drafted step: after the
chain the pass holds a copy of the judge suffix per step that sees the chain only up to that
step's end (the tree of `runner.verify_tree`, laid out here on the device, since the step ends
are known only there). The steps are then taken in order, as the host loop (`modes/dreamr.py`)
takes them:

- a step the judge accepts (p > alpha and s+ + s- >= the format floor) is committed as the
  draft's;
- else a step that is word for word the target's own greedy step there is committed as the
  target's (the fallback would commit just that);
- at the first other step, the target's tokens are committed up to their first difference from
  it, plus the target's token there (`resume`): that token is the next window's pending one, and
  the draft finishes the step (or starts the next one) from it. Later steps are dropped.

`exact` asks no judge, so it commits exactly the target's greedy chain: greedy speculative
decoding with step-long drafts, lossless, not DREAM-R. `dreamr` at alpha >= 1 asks the judge and
never follows it, so its output is the target's too, at the judge's cost.

Steps are cut where the target alone cuts them (a delimiter, or `max_step_tokens` since the last
step end) also across a resume: the draft's first step counts the tokens the target wrote of it
(`generate_steps`' `in_step`). So the chain ends where the target's would, at the first step end
at or past `max_new_tokens`, and every drafted step is a whole step of the chain.

What comes back beside the tokens rebuilds the host loop's step records (`Engine._records`): for
each committed token who wrote it and whether it ends a committed unit (a step, or the target's
part of one), with the CPN p of the unit's draft step, and per window the drafted step that was
not kept. The decisions, tokens and counters are the host loop's (tested); the target calls are
not: a fallback token that ends a step goes at the head of the next pass here, where the host
loop feeds it to the target with a call of its own.

Pass widths are dynamic (the drafted chain's length is known only on the device), so the pass is
a `lax.switch` over the padded widths `chunk_width` allows: one program, and each window pays
only for its own width. (XLA copies the target's cache into the branch taken, two 1.2 MB copies
a window for the DigitMath target; the two ways around it measured so far were slower,
docs/benchmarks.md.)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from dreamr_jax.models.generate import merge
from dreamr_jax.models.inputs import ModelInputs
from dreamr_jax.models.kv_cache import KVCache, rollback
from dreamr_jax.models.sampling import GREEDY
from dreamr_jax.speculative.cpn import cpn_verdicts
from dreamr_jax.speculative.runner import chunk_width, feed_token, generate_steps


@dataclasses.dataclass(frozen=True)
class LoopSpec:
    """The static shape of the loop: window W, step cap, budget, the step-ending tokens and the
    judge (its suffix and answer words; no suffix: `exact`, no judge)."""

    window: int
    max_step_tokens: int
    max_new_tokens: int
    stop_ids: tuple[int, ...]
    eos_ids: tuple[int, ...]
    pad_id: int
    judge_suffix: tuple[int, ...] = ()
    positive_ids: tuple[int, ...] = ()
    negative_ids: tuple[int, ...] = ()

    @property
    def slots(self) -> int:
        """Most drafted steps in a window: W, and the end of a step the target began."""
        return self.window + 1

    @property
    def chain(self) -> int:
        """Most chain tokens a pass verifies: a pending token and the drafted steps."""
        return 1 + self.slots * self.max_step_tokens

    @property
    def widths(self) -> tuple[int, ...]:
        widest = self.chain + self.slots * len(self.judge_suffix)
        return tuple(sorted({chunk_width(n) for n in range(1, widest + 1)}))

    @property
    def max_windows(self) -> int:
        # Every window commits a token, and the chain ends within a step past the budget.
        return self.max_new_tokens + self.max_step_tokens

    @property
    def out_len(self) -> int:
        # The chain ends at the first step end at or past the budget.
        return self.max_new_tokens + self.max_step_tokens


def _pass(graphdef, state, cache: KVCache, tokens, mask, offsets, seen, gather, *, width: int):
    """The first `width` tokens of a chunk into the target's cache: `tokens`, `mask`, `offsets`
    `[widest]` (positions after the cache's next one); `seen` `[widest, widest]`, which chunk
    tokens each one attends to (None: a plain chain). Returns the target's greedy token after
    each chunk token `[widest]` (-1 past `width`), its logits after the tokens at `gather`
    `[slots]` (None: none) and the cache holding the whole chunk."""
    model = merge(graphdef, state)
    positions = jnp.where(mask[:width], cache.next_position + offsets[:width], 0)
    inputs = ModelInputs(
        tokens[None, :width],
        mask[None, :width],
        jnp.broadcast_to(positions, (3, 1, width)).astype(jnp.int32),
        None,
        None if seen is None else seen[None, :width, :width],
    )
    hidden, cache = model.hidden_states(inputs, cache)
    logits = model.logits(hidden[0])
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    greedy = jnp.pad(greedy, (0, tokens.shape[0] - width), constant_values=-1)
    return greedy, None if gather is None else logits[gather], cache


def _tree(chain, length, step_ends, n_steps, suffix, widest: int):
    """The verification chunk: `chain [widest]` (its first `length` tokens real), then a copy of
    `suffix` (m tokens) per drafted step, copy i seeing the chain only through `step_ends[i]`
    `[slots]` (chain length through step i; the first `n_steps` are real). Returns tokens, mask,
    offsets `[widest]`, seen `[widest, widest]` and the index of each copy's last token
    `[slots]`."""
    m, slots = len(suffix), step_ends.shape[0]
    index = jnp.arange(widest)
    in_chain = index < length
    rel = index - length
    copy = jnp.where(rel >= 0, rel // m, slots)  # which step's query a token belongs to
    in_copy = (rel >= 0) & (copy < n_steps)
    end = step_ends[jnp.minimum(copy, slots - 1)]
    tokens = jnp.where(in_chain, chain, jnp.asarray(suffix, jnp.int32)[jnp.maximum(rel, 0) % m])
    offsets = jnp.where(in_chain, index, end + jnp.maximum(rel, 0) % m)
    causal = index[None, :] <= index[:, None]
    own_copy = in_copy[None, :] & (copy[None, :] == copy[:, None]) & causal
    seen = (in_chain[:, None] & causal) | (
        in_copy[:, None] & ((index[None, :] < end[:, None]) | own_copy)
    )
    return tokens, in_chain | in_copy, offsets, seen, length + (jnp.arange(slots) + 1) * m - 1


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
def speculate(
    t_graph,
    t_state,
    d_graph,
    d_state,
    t_cache: KVCache,
    d_cache: KVCache,
    t_logits,
    d_logits,
    spec: LoopSpec,
    min_confidence,
    alpha,
    floor,
):
    """The whole chain of one request (batch 1). t_logits, d_logits: `[1, vocab]` after each
    model's prompt; min_confidence, alpha, floor: traced scalars (`generate_steps`, the CPN
    threshold and format floor; the last two unused without a judge).

    Returns a dict: `tokens [out_len]` (the first `n` real), `n`, the counters `passes`,
    `proposed` (drafted steps), `accepted` (steps the judge accepted and were committed),
    `format_misses`; per committed token `by_draft`, `unit_end` and `unit_p` (the CPN p of the
    unit's draft step, NaN where none) `[out_len]`; per window the drafted step that was not
    kept: `dropped [max_windows, max_step_tokens]` (its first `dropped_len` tokens real),
    `dropped_p` and `dropped_at` (where in the chain the target's tokens replaced it).
    """
    d_model = merge(d_graph, d_state)
    widths = spec.widths
    widest = widths[-1]
    judged = bool(spec.judge_suffix)
    stop = jnp.asarray(spec.stop_ids + spec.eos_ids, jnp.int32)
    eos = jnp.asarray(spec.eos_ids, jnp.int32)
    budget, cap, slots = spec.max_new_tokens, spec.max_step_tokens, spec.slots
    key = jax.random.key(0)  # greedy: never drawn from
    branches = [functools.partial(_pass, t_graph, t_state, width=w) for w in widths]
    index = jnp.arange(widest)

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
        drafted, ends, k, _, d_cache, d_after = generate_steps(
            d_graph,
            d_state,
            d_logits,
            d_cache,
            key,
            (budget - c["n"])[None],
            slots,
            cap,
            GREEDY,
            spec.stop_ids,
            spec.eos_ids,
            min_confidence,
            spec.window + (c["in_step"] > 0),  # an open step does not count towards W
            in_step=c["in_step"][None],
            keep_marks=False,  # rollbacks here go to any token, from the verification
        )
        k, ends = k[0], ends[0]
        n_drafted = jnp.max(ends)
        length = n_drafted + has_p
        # The chain: the pending token, then the drafted tokens; padding after it.
        shifted = jnp.concatenate([c["pending"][None], drafted[0]])
        plain = jnp.concatenate([drafted[0], jnp.full((1,), -1, jnp.int32)])
        chain = jnp.pad(jnp.where(has_p, shifted, plain), (0, widest - spec.chain))
        chain = jnp.where(index < length, chain, spec.pad_id)
        real_step = jnp.arange(slots) < k
        step_end = jnp.where(real_step, ends + has_p, length)  # chain length through step i
        step_start = jnp.concatenate([has_p[None], step_end[:-1]])
        if judged:
            tokens, mask, offsets, seen, query = _tree(
                chain, length, step_end, k, spec.judge_suffix, widest
            )
            size = length + k * len(spec.judge_suffix)
        else:  # a plain chain, no queries
            tokens, mask, offsets, seen, query = chain, index < length, index, None, None
            size = length
        bucket = jnp.sum(jnp.asarray(widths) < size)
        greedy_after, verdict_logits, t_cache = jax.lax.switch(
            bucket, branches, c["t_cache"], tokens, mask, offsets, seen, query
        )
        if judged:
            v = cpn_verdicts(verdict_logits, spec.positive_ids, spec.negative_ids, alpha, floor)
            ok, p, misses = v.accept, v.p, jnp.sum(~v.format_ok & real_step)
        else:
            ok, p, misses = jnp.zeros((slots,), bool), jnp.full((slots,), jnp.nan), 0
        # The target's choice before each chain token: after the previous one, or for the first
        # after the last window.
        before = jnp.concatenate([c["t_next"][None], greedy_after[:-1]])
        wrong = (index >= has_p) & (index < length) & (chain != before)
        step_of = jnp.sum(real_step[None] & (step_end[None] <= index[:, None]), axis=1)
        own = ~jnp.zeros((slots,), bool).at[jnp.where(wrong, step_of, slots)].set(True, mode="drop")
        refused = real_step & ~(ok | own)
        kept = jnp.where(jnp.any(refused), jnp.argmax(refused), k)  # steps committed whole
        parted = kept < k
        at_kept = jnp.minimum(kept, slots - 1)  # (indexes only what `parted` guards)
        # chain[:m] is committed, then (if parted) the target's own token at m.
        m = jnp.where(parted, jnp.argmax(wrong & (step_of == kept)), length)
        mine = before[m]
        committed = jnp.where(index < m, chain, mine)
        new = m - has_p + parted
        # Compact the kept tokens to the front (they are contiguous from has_p).
        order = jnp.clip(index + has_p, 0, widest - 1)
        real = index < new
        kept_tokens = jnp.where(real, committed[order], spec.pad_id)
        ends_here, run = _step_ends(kept_tokens, c["in_step"], stop, cap)
        position = c["n"] + index  # of each kept token in the chain
        done = jnp.any(real & ends_here & ((position + 1 >= budget) | jnp.isin(kept_tokens, eos)))
        # Records: a unit ends with each committed step and with the target's part.
        step = step_of[order]  # the drafted step each kept token came from
        at = jnp.where(real, position, spec.out_len)
        unit_end = (order == step_end[jnp.minimum(step, slots - 1)] - 1) | (order == m)
        by_draft = (step < kept) & ok[jnp.minimum(step, slots - 1)]
        unit_p = jnp.where(step < kept, p[jnp.minimum(step, slots - 1)], jnp.nan)
        rejected = jax.lax.dynamic_slice(chain, (step_start[at_kept],), (cap,))
        rejected_len = jnp.where(parted, step_end[at_kept] - step_start[at_kept], 0)
        # Both caches back to the committed chain (the pending token is in neither yet).
        t_cache = rollback(t_cache, c["t_cache"].length + m, c["t_cache"].next_position + m)
        drop = n_drafted - (m - has_p)
        d_cache = rollback(d_cache, d_cache.length - drop, d_cache.next_position - drop)
        last = jnp.maximum(new - 1, 0)
        w = c["passes"]
        return {
            "t_cache": t_cache,
            "d_cache": d_cache,
            "t_next": greedy_after[length - 1],  # read only when no token is pending
            "d_logits": d_after,
            "tokens": c["tokens"].at[at].set(kept_tokens, mode="drop"),
            "n": c["n"] + new,
            "pending": jnp.where(parted, mine, -1),
            "in_step": jnp.where(ends_here[last], 0, run[last] % cap),
            "done": done | (w + 1 >= spec.max_windows),
            "passes": w + 1,
            "proposed": c["proposed"] + k,
            "accepted": c["accepted"] + jnp.sum(ok & (jnp.arange(slots) < kept)),
            "format_misses": c["format_misses"] + misses,
            "by_draft": c["by_draft"].at[at].set(by_draft, mode="drop"),
            "unit_end": c["unit_end"].at[at].set(unit_end, mode="drop"),
            "unit_p": c["unit_p"].at[at].set(unit_p, mode="drop"),
            "dropped": c["dropped"]
            .at[w]
            .set(jnp.where(jnp.arange(cap) < rejected_len, rejected, -1)),
            "dropped_len": c["dropped_len"].at[w].set(rejected_len),
            "dropped_p": c["dropped_p"].at[w].set(p[at_kept]),
            "dropped_at": c["dropped_at"].at[w].set(c["n"] + step_start[at_kept] - has_p),
        }

    zero = jnp.zeros((), jnp.int32)
    out_len, windows = spec.out_len, spec.max_windows
    carry = {
        "t_cache": t_cache,
        "d_cache": d_cache,
        "t_next": jnp.argmax(t_logits[0]).astype(jnp.int32),
        "d_logits": d_logits,
        "tokens": jnp.full((out_len,), -1, jnp.int32),
        "n": zero,
        "pending": jnp.full((), -1, jnp.int32),
        "in_step": zero,
        "done": jnp.zeros((), bool),
        "passes": zero,
        "proposed": zero,
        "accepted": zero,
        "format_misses": zero,
        "by_draft": jnp.zeros((out_len,), bool),
        "unit_end": jnp.zeros((out_len,), bool),
        "unit_p": jnp.full((out_len,), jnp.nan, jnp.float32),
        "dropped": jnp.full((windows, spec.max_step_tokens), -1, jnp.int32),
        "dropped_len": jnp.zeros((windows,), jnp.int32),
        "dropped_p": jnp.full((windows,), jnp.nan, jnp.float32),
        "dropped_at": jnp.zeros((windows,), jnp.int32),
    }
    c = jax.lax.while_loop(cond, body, carry)
    internal = ("t_cache", "d_cache", "t_next", "d_logits", "pending", "in_step", "done")
    return {name: value for name, value in c.items() if name not in internal}
