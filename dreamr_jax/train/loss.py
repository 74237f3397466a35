"""Next-token cross-entropy on the tokens a batch marks for training."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dreamr_jax.models.inputs import ModelInputs


def next_token_loss(model, inputs: ModelInputs, loss_mask: jax.Array) -> tuple[jax.Array, dict]:
    """Token-mean cross-entropy of predicting token t from tokens < t wherever `loss_mask[b, t]`.

    loss_mask: `[batch, seq]` bool, or float weights (a weighted token mean). Returns the loss
    and metrics (loss, accuracy, token count = total weight).
    """
    logits, _ = model.forward(inputs)  # [batch, seq, vocab] float32
    targets = inputs.input_ids[:, 1:]
    weights = loss_mask[:, 1:].astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    count = jnp.maximum(weights.sum(), 1.0)
    loss = (nll * weights).sum() / count
    correct = (jnp.argmax(logits[:, :-1], axis=-1) == targets).astype(jnp.float32)
    return loss, {
        "loss": loss,
        "token_accuracy": (correct * weights).sum() / count,
        "tokens": weights.sum(),
    }
