"""TBVM with CPN: the target's calibrated verdict on a candidate step.

From the target's next-token distribution after a judge query, `s+` is the probability mass of the
positive words and `s-` that of the negative ones; `p = s+ / (s+ + s-)`, computed in log space as
`sigmoid(logsumexp(positive log-probs) - logsumexp(negative log-probs))` so it stays exact when
both masses are tiny. A step is accepted iff `p > alpha` and `s+ + s- >= floor` (below the floor
the target ignored the answer format, which counts as a rejection). `alpha >= 1` never accepts.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Verdicts:
    """All `[batch]`: s_pos, s_neg (probability masses), p, accept (bool), format_ok (bool)."""

    s_pos: jax.Array
    s_neg: jax.Array
    p: jax.Array
    accept: jax.Array
    format_ok: jax.Array


def cpn_scores(
    logits: jax.Array, positive_ids: Sequence[int], negative_ids: Sequence[int]
) -> tuple[jax.Array, jax.Array]:
    """logits `[batch, vocab]` -> (p `[batch]`, mass s+ + s- `[batch]`), both float32."""
    v = cpn_verdicts(logits, tuple(positive_ids), tuple(negative_ids), 0.0, 0.0)
    return v.p, v.s_pos + v.s_neg


@functools.partial(jax.jit, static_argnums=(1, 2))
def cpn_verdicts(
    logits: jax.Array,
    positive_ids: tuple[int, ...],
    negative_ids: tuple[int, ...],
    alpha: float | jax.Array,
    floor: float | jax.Array,
) -> Verdicts:
    """The verdicts on a padded batch of judge queries: logits `[batch, vocab]` at each query's
    last token (alpha and floor are traced, so sweeping them does not recompile)."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    log_pos = jax.nn.logsumexp(log_probs[:, jnp.asarray(positive_ids)], axis=-1)
    log_neg = jax.nn.logsumexp(log_probs[:, jnp.asarray(negative_ids)], axis=-1)
    s_pos, s_neg = jnp.exp(log_pos), jnp.exp(log_neg)
    # sigmoid of the log-ratio; both masses zero (-inf - -inf) is no evidence: p = 0.5.
    diff = jnp.where(jnp.isneginf(log_pos) & jnp.isneginf(log_neg), 0.0, log_pos - log_neg)
    p = jax.nn.sigmoid(diff)
    format_ok = (s_pos + s_neg) >= floor
    return Verdicts(s_pos, s_neg, p, (p > alpha) & format_ok, format_ok)
