"""Next-token cross-entropy on the tokens a batch marks for training."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dreamr_jax.models.inputs import ModelInputs
from dreamr_jax.models.logits import over_positions


def next_token_loss(model, inputs: ModelInputs, loss_mask: jax.Array) -> tuple[jax.Array, dict]:
    """Token-mean cross-entropy of predicting token t from tokens < t wherever `loss_mask[b, t]`,
    the logits a chunk of positions at a time (`models.logits.over_positions`).

    loss_mask: `[batch, seq]` bool, or float weights (a weighted token mean). Returns the loss
    and metrics (loss, accuracy, token count = total weight).
    """
    hidden, _ = model.hidden_states(inputs)
    # Position t predicts token t + 1; the last position predicts nothing (its target is 0,
    # weighed 0), which keeps the head's input the whole `[batch, seq]` as before chunking.
    targets = jnp.pad(inputs.input_ids[:, 1:], ((0, 0), (0, 1)))

    def scored(logits, target):  # [batch, c, vocab], [batch, c] -> [batch, c, 2]
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        log_p = jnp.take_along_axis(log_probs, target[..., None], axis=-1)[..., 0]
        hit = (jnp.argmax(logits, axis=-1) == target).astype(jnp.float32)
        return jnp.stack([log_p, hit], axis=-1)

    scores = over_positions(model, scored, hidden, targets)[:, :-1]
    weights = loss_mask[:, 1:].astype(jnp.float32)
    count = jnp.maximum(weights.sum(), 1.0)
    loss = -(scores[..., 0] * weights).sum() / count
    return loss, {
        "loss": loss,
        "token_accuracy": (scores[..., 1] * weights).sum() / count,
        "tokens": weights.sum(),
    }
