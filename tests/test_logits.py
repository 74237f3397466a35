"""Logits where they are read (`models/logits.py`): a chunked head gives what the whole
`[batch, seq, vocab]` head gives, values and gradients, and gathering hidden states before the
head gives the gathered logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreamr_jax.config import load_config
from dreamr_jax.models import init_model
from dreamr_jax.models.logits import greedy_tokens, logits_at, over_positions


def _model_and_hidden():
    model = init_model(load_config("configs/models/tiny.yaml").model, seed=0)
    hidden = jax.random.normal(jax.random.key(1), (3, 11, model.config.text.hidden_size))
    return model, hidden


def _log_p(logits, token):  # [b, c, vocab], [b, c] -> [b, c]
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(log_probs, token[..., None], axis=-1)[..., 0]


def test_chunks_of_positions_give_the_whole_heads_values_and_gradients():
    model, hidden = _model_and_hidden()
    tokens = jax.random.randint(
        jax.random.key(2), hidden.shape[:2], 0, model.config.text.vocab_size
    )
    graphdef, params = nnx.split(model, nnx.Param)

    def total(params, chunk):
        m = nnx.merge(graphdef, params)
        return over_positions(m, _log_p, hidden, tokens, chunk=chunk).sum()

    whole = _log_p(model.logits(hidden), tokens)
    for chunk in (4, 5, 11):  # padded last chunk, padded, one chunk
        np.testing.assert_allclose(
            over_positions(model, _log_p, hidden, tokens, chunk=chunk), whole, atol=1e-5
        )
    want = jax.grad(total)(params, 64)
    got = jax.grad(total)(params, 4)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(want))


def test_greedy_tokens_and_gathered_logits_are_the_whole_heads():
    model, hidden = _model_and_hidden()
    every = model.logits(hidden)
    np.testing.assert_array_equal(greedy_tokens(model, hidden), jnp.argmax(every, axis=-1))
    index = jnp.asarray([[0, 10], [3, 3], [7, 1]])
    np.testing.assert_allclose(
        logits_at(model, hidden, index),
        jnp.take_along_axis(every, index[..., None], axis=1),
        atol=1e-5,
    )
