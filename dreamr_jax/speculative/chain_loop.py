"""One model alone (`target`, `draft`) over a batch of rows as one device loop: a token per row
in play each iteration, until one row's chain ends, so that a finished row can be refilled with
the next request while the others go on (`batch.py`).

A row's chain ends as the other modes end theirs (`window_loop.py`): at the first step end at or
past `max_new_tokens`, or at EOS; a step ends at a step-ending token or `max_step_tokens` tokens
after the last end. The host cuts the chain into steps by the same rule (`Engine.split_steps`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from dreamr_jax.models.generate import merge
from dreamr_jax.models.kv_cache import KVCache, set_row
from dreamr_jax.models.sampling import Sampling, sample
from dreamr_jax.speculative.runner import feed_rows, until_a_row_finishes


@dataclasses.dataclass(frozen=True)
class ChainSpec:
    """The static shape of the loop: step cap, budget, the step-ending tokens, the sampling."""

    max_step_tokens: int
    max_new_tokens: int
    stop_ids: tuple[int, ...]
    eos_ids: tuple[int, ...]
    sampling: Sampling

    @property
    def out_len(self) -> int:
        # A step begins below the budget and is at most max_step_tokens long.
        return self.max_new_tokens + self.max_step_tokens


@functools.partial(jax.jit, static_argnums=0)
def start_rows(spec: ChainSpec, cache: KVCache, logits, keys, active) -> dict:
    """The loop's state over a batch of rows: the cache and next-token logits `[rows, vocab]`
    after each row's prompt, each row's random key `[rows]` and which rows hold a request
    `active [rows]`."""
    rows = logits.shape[0]
    return {
        "cache": cache,
        "logits": logits,
        "key": keys,
        "active": active,
        "tokens": jnp.full((rows, spec.out_len), -1, jnp.int32),
        "n": jnp.zeros((rows,), jnp.int32),
        "in_step": jnp.zeros((rows,), jnp.int32),
        "done": jnp.zeros((rows,), bool),
    }


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def admit(spec: ChainSpec, state: dict, row, cache: KVCache, logits, key) -> dict:
    """`state` with a new request in `row` (traced): its one-row cache and logits `[1, vocab]`
    after the prompt, and its key."""
    return {
        "cache": set_row(state["cache"], row, cache),
        "logits": state["logits"].at[row].set(logits[0]),
        "key": state["key"].at[row].set(key),
        "active": state["active"].at[row].set(True),
        "tokens": state["tokens"].at[row].set(-1),
        "n": state["n"].at[row].set(0),
        "in_step": state["in_step"].at[row].set(0),
        "done": state["done"].at[row].set(False),
    }


@functools.partial(jax.jit, static_argnums=(0, 3), donate_argnums=2)
def decode_chains(graphdef, state_leaves, state: dict, spec: ChainSpec) -> dict:
    """Tokens for every row in play (`active` and not `done`) until one row's chain ends or
    none is in play. Per row: `tokens [out_len]` (the first `n` real), `n`, `done`."""
    model = merge(graphdef, state_leaves)
    stop = jnp.asarray(spec.stop_ids + spec.eos_ids, jnp.int32)
    eos = jnp.asarray(spec.eos_ids, jnp.int32)

    def draw(logits, key):
        # One row at a time with its own key, so a row's draws do not depend on its batch.
        key, sub = jax.random.split(key)
        return sample(logits[None], sub, spec.sampling)[0], key

    def body(c):
        live = c["active"] & ~c["done"]
        drawn, keys = jax.vmap(draw)(c["logits"], c["key"])
        token = jnp.where(live, drawn, -1)
        rows = jnp.arange(token.shape[0])
        tokens = c["tokens"].at[rows, jnp.where(live, c["n"], spec.out_len)].set(token, mode="drop")
        cache, logits = feed_rows(model, token, live, c["cache"], c["logits"])
        n, in_step = c["n"] + live, c["in_step"] + live
        step_ends = live & (jnp.isin(token, stop) | (in_step >= spec.max_step_tokens))
        ends_chain = step_ends & (jnp.isin(token, eos) | (n >= spec.max_new_tokens))
        return {
            **c,
            "cache": cache,
            "logits": logits,
            "key": keys,
            "tokens": tokens,
            "n": n,
            "in_step": jnp.where(step_ends, 0, in_step),
            "done": c["done"] | ends_chain,
        }

    return jax.lax.while_loop(until_a_row_finishes, body, state)
