"""`exact`, and `dreamr` greedy with the `resume` fallback, as one device loop over a batch of
rows, a request each: draft a window, verify it in one target pass, commit, roll both caches
back, repeat, with no host round trip until a row's chain is done (then the host refills that
row, `batch.py`). Rows are independent: each has its own chain, step and caches' lengths, and
the per-row decisions below are written for one row and mapped over the batch (`jax.vmap`).

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
only for its widest row's width. (XLA copies the target's cache into the branch taken, two
1.2 MB copies a window and row for the DigitMath target; the two ways around it measured so far
were slower, docs/benchmarks.md.)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from dreamr_jax.models.generate import merge
from dreamr_jax.models.inputs import ModelInputs
from dreamr_jax.models.kv_cache import KVCache, rollback, set_row
from dreamr_jax.models.logits import greedy_tokens, logits_at
from dreamr_jax.models.sampling import GREEDY
from dreamr_jax.speculative.cpn import cpn_verdicts
from dreamr_jax.speculative.runner import (
    chunk_width,
    feed_rows,
    generate_steps,
    until_a_row_finishes,
)


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

    def fresh_row(self, t_logits) -> dict:
        """A row's state before its first window, from the target's logits after its prompt
        `[vocab]`."""
        out_len, windows, zero = self.out_len, self.max_windows, jnp.zeros((), jnp.int32)
        return {
            "t_next": jnp.argmax(t_logits).astype(jnp.int32),
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
            "dropped": jnp.full((windows, self.max_step_tokens), -1, jnp.int32),
            "dropped_len": jnp.zeros((windows,), jnp.int32),
            "dropped_p": jnp.full((windows,), jnp.nan, jnp.float32),
            "dropped_at": jnp.zeros((windows,), jnp.int32),
        }


def target_pass(
    graphdef, state, cache: KVCache, tokens, mask, offsets, seen, gather, *, width: int
):
    """The first `width` tokens of each row's chunk into the target's cache: `tokens`, `mask`,
    `offsets` `[rows, widest]` (positions after each row's next one); `seen` `[rows, widest,
    widest]`, which chunk tokens each one attends to (None: plain chains). Returns the target's
    greedy token after each chunk token `[rows, widest]` (-1 past `width`), its logits after
    the tokens at `gather` `[rows, slots, vocab]` (None: none) and the cache holding the chunks."""
    model = merge(graphdef, state)
    positions = jnp.where(mask[:, :width], cache.next_position[:, None] + offsets[:, :width], 0)
    inputs = ModelInputs(
        tokens[:, :width],
        mask[:, :width],
        jnp.broadcast_to(positions[None], (3, *positions.shape)).astype(jnp.int32),
        None,
        None if seen is None else seen[:, :width, :width],
    )
    hidden, cache = model.hidden_states(inputs, cache)
    # Every position's greedy token, a chunk of positions at a time; whole logits only at the
    # positions gathered.
    greedy = greedy_tokens(model, hidden)
    greedy = jnp.pad(greedy, ((0, 0), (0, tokens.shape[1] - width)), constant_values=-1)
    picked = None if gather is None else logits_at(model, hidden, gather)
    return greedy, picked, cache


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


def step_boundaries(tokens, in_step, stop, cap: int):
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


def _plan(pending, has_p, drafted, ends, k, *, spec: LoopSpec):
    """One row's verification chunk: the pending token (if `has_p`), then the `k` drafted steps
    `drafted [slots * max_step_tokens]` ending at `ends [slots]`, then (with a judge) a suffix
    copy per step (`_tree`). Arrays `[widest]` unless named otherwise."""
    widest, slots = spec.widths[-1], spec.slots
    index = jnp.arange(widest)
    n_drafted = jnp.max(ends)
    length = n_drafted + has_p
    # The chain: the pending token, then the drafted tokens; padding after it.
    shifted = jnp.concatenate([pending[None], drafted])
    plain = jnp.concatenate([drafted, jnp.full((1,), -1, jnp.int32)])
    chain = jnp.pad(jnp.where(has_p, shifted, plain), (0, widest - spec.chain))
    chain = jnp.where(index < length, chain, spec.pad_id)
    real_step = jnp.arange(slots) < k
    step_end = jnp.where(real_step, ends + has_p, length)  # chain length through step i
    step_start = jnp.concatenate([has_p[None], step_end[:-1]])
    plan = {
        "chain": chain,
        "length": length,
        "n_drafted": n_drafted,
        "has_p": has_p,
        "k": k,
        "real_step": real_step,
        "step_end": step_end,
        "step_start": step_start,
    }
    if spec.judge_suffix:
        tokens, mask, offsets, seen, query = _tree(
            chain, length, step_end, k, spec.judge_suffix, widest
        )
        size = length + k * len(spec.judge_suffix)
    else:  # a plain chain, no queries
        tokens, mask, offsets, seen, query = chain, index < length, index, None, None
        size = length
    chunk = {"tokens": tokens, "mask": mask, "offsets": offsets, "seen": seen, "query": query}
    return plan, chunk, size


def _commit(row, plan, greedy_after, verdict_logits, live, alpha, floor, *, spec: LoopSpec):
    """One row's decisions on its verified window (module docstring), as the row's new state,
    the chain tokens the target's cache keeps `m`, and the drafted tokens the draft's drops."""
    widest, slots, cap = spec.widths[-1], spec.slots, spec.max_step_tokens
    index = jnp.arange(widest)
    stop = jnp.asarray(spec.stop_ids + spec.eos_ids, jnp.int32)
    eos = jnp.asarray(spec.eos_ids, jnp.int32)
    chain, length, has_p, k = plan["chain"], plan["length"], plan["has_p"], plan["k"]
    real_step, step_end, step_start = plan["real_step"], plan["step_end"], plan["step_start"]
    if spec.judge_suffix:
        v = cpn_verdicts(verdict_logits, spec.positive_ids, spec.negative_ids, alpha, floor)
        ok, p, misses = v.accept, v.p, jnp.sum(~v.format_ok & real_step)
    else:
        ok, p, misses = jnp.zeros((slots,), bool), jnp.full((slots,), jnp.nan), 0
    # The target's choice before each chain token: after the previous one, or for the first
    # after the last window.
    before = jnp.concatenate([row["t_next"][None], greedy_after[:-1]])
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
    ends_here, run = step_boundaries(kept_tokens, row["in_step"], stop, cap)
    position = row["n"] + index  # of each kept token in the chain
    budget = spec.max_new_tokens
    finished = jnp.any(real & ends_here & ((position + 1 >= budget) | jnp.isin(kept_tokens, eos)))
    # Records: a unit ends with each committed step and with the target's part.
    step = step_of[order]  # the drafted step each kept token came from
    at = jnp.where(real, position, spec.out_len)
    unit_end = (order == step_end[jnp.minimum(step, slots - 1)] - 1) | (order == m)
    by_draft = (step < kept) & ok[jnp.minimum(step, slots - 1)]
    unit_p = jnp.where(step < kept, p[jnp.minimum(step, slots - 1)], jnp.nan)
    rejected = jax.lax.dynamic_slice(chain, (step_start[at_kept],), (cap,))
    rejected_len = jnp.where(parted, step_end[at_kept] - step_start[at_kept], 0)
    last = jnp.maximum(new - 1, 0)
    w = row["passes"]
    window = jnp.where(live, w, spec.max_windows)  # a row not in play records nothing
    new_row = {
        "t_next": jnp.where(live, greedy_after[length - 1], row["t_next"]),
        "tokens": row["tokens"].at[at].set(kept_tokens, mode="drop"),
        "n": row["n"] + new,
        "pending": jnp.where(live, jnp.where(parted, mine, -1), row["pending"]),
        "in_step": jnp.where(live, jnp.where(ends_here[last], 0, run[last] % cap), row["in_step"]),
        "done": row["done"] | (live & (finished | (w + 1 >= spec.max_windows))),
        "passes": w + live,
        "proposed": row["proposed"] + k,
        "accepted": row["accepted"] + jnp.sum(ok & (jnp.arange(slots) < kept)),
        "format_misses": row["format_misses"] + misses,
        "by_draft": row["by_draft"].at[at].set(by_draft, mode="drop"),
        "unit_end": row["unit_end"].at[at].set(unit_end, mode="drop"),
        "unit_p": row["unit_p"].at[at].set(unit_p, mode="drop"),
        "dropped": row["dropped"]
        .at[window]
        .set(jnp.where(jnp.arange(cap) < rejected_len, rejected, -1), mode="drop"),
        "dropped_len": row["dropped_len"].at[window].set(rejected_len, mode="drop"),
        "dropped_p": row["dropped_p"].at[window].set(p[at_kept], mode="drop"),
        "dropped_at": row["dropped_at"]
        .at[window]
        .set(row["n"] + step_start[at_kept] - has_p, mode="drop"),
    }
    return new_row, m, plan["n_drafted"] - (m - has_p)


@functools.partial(jax.jit, static_argnums=0)
def start_rows(spec, t_cache: KVCache, d_cache: KVCache, t_logits, d_logits, active):
    """The state over a batch of rows of a loop of draft and target together (this one, or
    `sd_loop`'s; `spec.fresh_row` makes a row's own state): both models' caches and next-token
    logits `[rows, vocab]` after each row's prompt, and which rows hold a request
    `active [rows]`."""
    rows = jax.vmap(spec.fresh_row)(t_logits)
    return {"t_cache": t_cache, "d_cache": d_cache, "d_logits": d_logits, "active": active, **rows}


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def admit(spec, state: dict, row, t_cache: KVCache, d_cache: KVCache, t_logits, d_logits):
    """`state` (`start_rows`) with a new request in `row` (a traced index): the one-row caches
    and logits `[1, vocab]` after its prompt, and a fresh row state."""
    fresh = spec.fresh_row(t_logits[0])
    state = {
        **state,
        "t_cache": set_row(state["t_cache"], row, t_cache),
        "d_cache": set_row(state["d_cache"], row, d_cache),
        "d_logits": state["d_logits"].at[row].set(d_logits[0]),
        "active": state["active"].at[row].set(True),
    }
    return {**state, **{name: state[name].at[row].set(value) for name, value in fresh.items()}}


@functools.partial(jax.jit, static_argnums=(0, 2, 5), donate_argnums=4)
def speculate(
    t_graph,
    t_state,
    d_graph,
    d_state,
    state: dict,
    spec: LoopSpec,
    min_confidence,
    alpha,
    floor,
):
    """Windows over every row in play (`active` and not `done`) until one of them finishes its
    chain, or none is left in play. `state` (`start_rows`, `admit`; donated) holds per row the
    caches and, `[rows]` or `[rows, ...]`: `tokens [out_len]` (the first `n` real), `n`, the
    counters `passes`, `proposed` (drafted steps), `accepted` (steps the judge accepted and
    were committed), `format_misses`; per committed token `by_draft`, `unit_end` and `unit_p`
    (the CPN p of the unit's draft step, NaN where none) `[out_len]`; per window the drafted
    step that was not kept: `dropped [max_windows, max_step_tokens]` (its first `dropped_len`
    tokens real), `dropped_p` and `dropped_at` (where in the chain the target's tokens
    replaced it). min_confidence, alpha, floor: traced scalars (`generate_steps`, the CPN
    threshold and format floor; the last two unused without a judge).

    Rows do not wait for each other within a window beyond the batch's shapes: the draft's
    step loop runs until every row's window is written, and the target's pass is as wide as
    the widest row's chunk.
    """
    d_model = merge(d_graph, d_state)
    widths = spec.widths
    key = jax.random.key(0)  # greedy: never drawn from
    branches = [functools.partial(target_pass, t_graph, t_state, width=w) for w in widths]
    plan_rows = jax.vmap(functools.partial(_plan, spec=spec))
    commit_rows = jax.vmap(
        functools.partial(_commit, spec=spec), in_axes=(0, 0, 0, 0, 0, None, None)
    )
    per_row = ("t_cache", "d_cache", "d_logits", "active")

    def body(c):
        live = c["active"] & ~c["done"]
        has_p = (c["pending"] >= 0) & live
        # The draft takes the target's token that ended the last window (nothing if none).
        pending = jnp.maximum(c["pending"], 0)
        d_cache, d_logits = feed_rows(d_model, pending, has_p, c["d_cache"], c["d_logits"])
        drafted, ends, k, _, _, d_cache, d_after = generate_steps(
            d_graph,
            d_state,
            d_logits,
            d_cache,
            key,
            jnp.where(live, spec.max_new_tokens - c["n"], 0),
            spec.slots,
            spec.max_step_tokens,
            GREEDY,
            spec.stop_ids,
            spec.eos_ids,
            min_confidence,
            spec.window + (c["in_step"] > 0),  # an open step does not count towards W
            in_step=c["in_step"],
            keep_marks=False,  # rollbacks here go to any token, from the verification
            active=live,
        )
        plan, chunk, size = plan_rows(c["pending"], has_p, drafted, ends, k)
        bucket = jnp.sum(jnp.asarray(widths) < jnp.max(size))
        greedy_after, verdict_logits, t_cache = jax.lax.switch(
            bucket,
            branches,
            c["t_cache"],
            chunk["tokens"],
            chunk["mask"],
            chunk["offsets"],
            chunk["seen"],
            chunk["query"],
        )
        rows = {name: value for name, value in c.items() if name not in per_row}
        rows, m, drop = commit_rows(rows, plan, greedy_after, verdict_logits, live, alpha, floor)
        # Both caches back to the committed chains (a pending token is in neither yet).
        before = c["t_cache"]
        t_cache = rollback(t_cache, before.length + m, before.next_position + m)
        d_cache = rollback(d_cache, d_cache.length - drop, d_cache.next_position - drop)
        return {
            **rows,
            "t_cache": t_cache,
            "d_cache": d_cache,
            "d_logits": d_after,
            "active": c["active"],
        }

    return jax.lax.while_loop(until_a_row_finishes, body, state)
