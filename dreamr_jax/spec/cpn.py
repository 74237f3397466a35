"""CPN: the calibrated probability that the target judges a step correct.

From the target's next-token distribution after a judge query, `s+` is the probability mass of the
positive words and `s-` that of the negative ones; `p = s+ / (s+ + s-)`, computed in log space as
`sigmoid(logsumexp(positive logits) - logsumexp(negative logits))` so it stays exact when both
masses are tiny. `mass = s+ + s-` tells whether the target answered in the expected format at all.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def cpn_scores(
    logits: jax.Array, positive_ids: Sequence[int], negative_ids: Sequence[int]
) -> tuple[jax.Array, jax.Array]:
    """logits `[batch, vocab]` -> (p `[batch]`, mass `[batch]`), both float32."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    log_pos = jax.nn.logsumexp(log_probs[:, jnp.asarray(positive_ids)], axis=-1)
    log_neg = jax.nn.logsumexp(log_probs[:, jnp.asarray(negative_ids)], axis=-1)
    return jax.nn.sigmoid(log_pos - log_neg), jnp.exp(log_pos) + jnp.exp(log_neg)
