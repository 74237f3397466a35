"""A static KV cache with per-row lengths, so rows of a batch can commit and roll back
independently (speculative steps accept different amounts per row)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dreamr_jax.config.schema import TextConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """k, v: `[layers, batch, kv_heads, max_len, head_dim]`, the layout `text.attention` reads
    in place.

    valid: `[batch, max_len]` bool, slot holds a real token (False for left padding).
    length: `[batch]` int32, slots in use; the next token of row b goes to slot `length[b]`.
    next_position: `[batch]` int32, the M-RoPE position the next text token of each row takes.
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    length: jax.Array
    next_position: jax.Array

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


def init_cache(cfg: TextConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
    return KVCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        valid=jnp.zeros((batch, max_len), bool),
        length=jnp.zeros((batch,), jnp.int32),
        next_position=jnp.zeros((batch,), jnp.int32),
    )


def rollback(cache: KVCache, length: jax.Array, next_position: jax.Array) -> KVCache:
    """Truncates every row to `length [batch]` slots; later slots are dropped from attention.

    Entries past `length` keep stale values but are never read: attention only looks at slots
    below the query's own slot, and writes overwrite them before they count again.
    """
    # From `valid`, not k: host-side callers roll back a cache whose k and v are left out.
    slots = jnp.arange(cache.valid.shape[1])[None, :]
    return dataclasses.replace(
        cache,
        valid=cache.valid & (slots < length[:, None]),
        length=length.astype(jnp.int32),
        next_position=next_position.astype(jnp.int32),
    )


def set_row(cache: KVCache, row, one: KVCache) -> KVCache:
    """`cache` with row `row` (a traced index) replaced by the single row of `one` (same
    max_len): a request prefilled alone, moved into a batch."""
    return KVCache(
        k=cache.k.at[:, row].set(one.k[:, 0]),
        v=cache.v.at[:, row].set(one.v[:, 0]),
        valid=cache.valid.at[row].set(one.valid[0]),
        length=cache.length.at[row].set(one.length[0]),
        next_position=cache.next_position.at[row].set(one.next_position[0]),
    )
