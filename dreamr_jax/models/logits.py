"""Logits where they are read, a chunk of positions at a time.

Qwen3-VL's vocabulary is 151,936 tokens: the float32 logits of a `[batch, seq]` chunk cost
`batch * seq * 0.6 MB`, 5 GB for 8 rows of 1,024 tokens, more than the hidden states of every
layer together. So nothing here makes that tensor whole: logits wanted at a few positions are
computed from the hidden states gathered there (`logits_at`), and what every position needs
(its greedy token, the log-probability of the token that follows it) is reduced chunk by chunk
(`over_positions`), the backward pass recomputing each chunk's logits instead of keeping them.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

POSITIONS_PER_CHUNK = 256  # `[batch, 256, vocab]` float32 logits at a time: 155 MB a row on Qwen


def logits_at(model, hidden: jax.Array, index: jax.Array) -> jax.Array:
    """Logits `[batch, g, vocab]` (float32) at positions `index` `[batch, g]` of `hidden`
    `[batch, t, hidden]`: the head runs on the g gathered positions only."""
    return model.logits(jnp.take_along_axis(hidden, index[..., None], axis=1))


def greedy_tokens(model, hidden: jax.Array) -> jax.Array:
    """The argmax token after every position of `hidden` `[batch, t, hidden]`: `[batch, t]`
    int32, a chunk of positions at a time."""

    def argmax(logits):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    return over_positions(model, argmax, hidden)


def over_positions(
    model,
    reduce: Callable,
    hidden: jax.Array,
    *per_position: jax.Array,
    chunk: int = POSITIONS_PER_CHUNK,
) -> jax.Array:
    """`reduce(logits [batch, c, vocab], *slices [batch, c, ...]) -> [batch, c, ...]` over chunks
    of c <= `chunk` positions of `hidden` `[batch, t, hidden]` (and of each `per_position` array
    `[batch, t, ...]`), joined to `[batch, t, ...]`. Where t fits one chunk this is one call, the
    computation of an unchunked head. Differentiable: the backward pass recomputes a chunk's
    logits from its hidden states rather than keeping them."""

    def one(hidden, *rest):
        return reduce(model.logits(hidden), *rest)

    t = hidden.shape[1]
    if t <= chunk:
        return one(hidden, *per_position)
    n = -(-t // chunk)

    def split(x):  # [batch, t, ...] -> [n, batch, chunk, ...], zero-padded
        x = jnp.pad(x, [(0, 0), (0, n * chunk - t)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(x.shape[0], n, chunk, *x.shape[2:]), 1, 0)

    chunks = tuple(split(x) for x in (hidden, *per_position))
    out = jax.lax.map(jax.checkpoint(lambda xs: one(*xs)), chunks)
    out = jnp.moveaxis(out, 0, 1)
    return out.reshape(out.shape[0], n * chunk, *out.shape[3:])[:, :t]
