"""Jitted prefill and decode over split graphdef/state, and a whole-generation device loop.

The hot functions take `(graphdef, state)` and are plain `jax.jit`s (a few microseconds of
dispatch, against ~300 us for `nnx.jit`); the KV cache is donated so XLA updates it in place, and
the decode loop is one `lax.while_loop` that stops on EOS, so the host never blocks per token.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreamr_jax.models.inputs import ModelInputs, prepare_inputs
from dreamr_jax.models.kv_cache import KVCache, init_cache
from dreamr_jax.models.sampling import GREEDY, Sampling, sample


class StaticGraph:
    """A model's GraphDef and state treedef as a `jax.jit` static argument, hashed by identity.

    flax hashes a GraphDef by walking its whole node tree (about 1 ms for the 7M DigitMath
    target) and flattens an `nnx.State` in about 0.3 ms; an engine that calls jitted functions
    once per reasoning step would pay both on every call. Pair it with the state's flat leaves.
    """

    def __init__(self, graphdef, treedef):
        self.graphdef, self.treedef = graphdef, treedef

    @classmethod
    def split(cls, model) -> tuple[StaticGraph, list[jax.Array]]:
        graphdef, state = nnx.split(model)
        leaves, treedef = jax.tree.flatten(state)
        return cls(graphdef, treedef), leaves

    def merge(self, leaves):
        return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, leaves))


def merge(graphdef, state):
    """The model of `(graphdef, state)` or of `(StaticGraph, leaves)`."""
    if isinstance(graphdef, StaticGraph):
        return graphdef.merge(state)
    return nnx.merge(graphdef, state)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=3)
def prefill(graphdef, state, inputs: ModelInputs, cache: KVCache):
    """Runs a prompt chunk into `cache`; returns logits of its last position `[batch, vocab]`
    (left padding puts every row's last token there) and the cache."""
    model = merge(graphdef, state)
    hidden, cache = model.hidden_states(inputs, cache)
    return model.logits(hidden[:, -1]), cache


def _decode_inputs(tokens: jax.Array, cache: KVCache) -> ModelInputs:
    b = tokens.shape[0]
    positions = jnp.broadcast_to(cache.next_position[None, :, None], (3, b, 1))
    return ModelInputs(tokens[:, None], jnp.ones((b, 1), bool), positions, None)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=3)
def decode_step(graphdef, state, tokens: jax.Array, cache: KVCache):
    """Feeds one token per row `[batch]`; returns next-token logits `[batch, vocab]` and cache."""
    model = nnx.merge(graphdef, state)
    hidden, cache = model.hidden_states(_decode_inputs(tokens, cache), cache)
    return model.logits(hidden[:, 0]), cache


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7, 8), donate_argnums=3)
def decode_loop(
    graphdef,
    state,
    first_logits: jax.Array,
    cache: KVCache,
    key: jax.Array,
    max_new_tokens: int,
    sampling: Sampling,
    eos_ids: tuple[int, ...],
    pad_id: int,
):
    """Samples up to `max_new_tokens` tokens per row `[batch, max_new_tokens]` (pad after EOS)
    inside one while loop that ends as soon as every row has finished."""
    model = nnx.merge(graphdef, state)
    b = first_logits.shape[0]
    eos = jnp.asarray(eos_ids, jnp.int32)

    def pick(logits, key, done):
        key, sub = jax.random.split(key)
        token = sample(logits, sub, sampling)
        token = jnp.where(done, pad_id, token)
        return token, done | jnp.isin(token, eos), key

    token, done, key = pick(first_logits, key, jnp.zeros((b,), bool))
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)

    def cond(carry):
        i, _, _, done, _, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, out, token, done, cache, key = carry
        hidden, cache = model.hidden_states(_decode_inputs(token, cache), cache)
        token, done, key = pick(model.logits(hidden[:, 0]), key, done)
        return i + 1, out.at[:, i].set(token), token, done, cache, key

    _, out, _, _, cache, _ = jax.lax.while_loop(cond, body, (1, out, token, done, cache, key))
    return out, cache


def generate(
    model,
    input_ids,
    attention_mask=None,
    pixel_values=None,
    image_grid_thw=None,
    *,
    max_new_tokens: int = 32,
    sampling: Sampling = GREEDY,
    key: jax.Array | None = None,
    max_len: int | None = None,
) -> np.ndarray:
    """Generates `[batch, max_new_tokens]` token ids (pad after EOS) for a left-padded batch."""
    cfg = model.config
    cfg.require_generation_ids()
    inputs, _ = prepare_inputs(cfg, input_ids, attention_mask, pixel_values, image_grid_thw)
    batch, seq = inputs.input_ids.shape
    max_len = max_len or seq + max_new_tokens
    if max_len < seq + max_new_tokens:
        raise ValueError(f"max_len {max_len} < prompt {seq} + max_new_tokens {max_new_tokens}")
    graphdef, state = nnx.split(model)
    cache = init_cache(cfg.text, batch, max_len, model.dtype)
    logits, cache = prefill(graphdef, state, inputs, cache)
    key = jax.random.key(0) if key is None else key
    out, _ = decode_loop(
        graphdef,
        state,
        logits,
        cache,
        key,
        max_new_tokens,
        sampling,
        tuple(cfg.eos_token_ids),
        cfg.pad_token_id,
    )
    return np.asarray(out)
