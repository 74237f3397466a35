"""Rotary position embeddings of Qwen3-VL: interleaved 3D M-RoPE for the decoder and axial 2D
rotary for the vision tower. Device-side functions only; positions are computed on the host in
`inputs.py`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def inverse_frequencies(dim: int, theta: float) -> np.ndarray:
    """`[dim // 2]` inverse frequencies `theta ** (-2i / dim)` in float32."""
    return (1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))).astype(np.float32)


def mrope_axis_of_frequency(mrope_section: tuple[int, ...], n_freq: int) -> np.ndarray:
    """`[n_freq]` which position row (0 = T, 1 = H, 2 = W) drives each rotary frequency.

    Interleaved M-RoPE cycles T, H, W over the first `3 * section` frequencies and gives the rest
    to T (the layout of transformers' `Qwen3VLTextRotaryEmbedding.recomposition_frequencies`).
    """
    axis = np.zeros((n_freq,), np.int32)
    for dim in (1, 2):
        axis[dim : mrope_section[dim] * 3 : 3] = dim
    return axis


def text_rope(
    positions: jax.Array, head_dim: int, theta: float, mrope_section: tuple[int, ...], dtype
) -> tuple[jax.Array, jax.Array]:
    """cos and sin `[batch, seq, head_dim]` for M-RoPE positions `[3, batch, seq]`."""
    inv_freq = jnp.asarray(inverse_frequencies(head_dim, theta))
    axis = mrope_axis_of_frequency(mrope_section, head_dim // 2)
    pos = positions.astype(jnp.float32)[axis]  # [freq, batch, seq]
    freqs = jnp.moveaxis(pos, 0, -1) * inv_freq  # [batch, seq, freq]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates `x [batch, seq, heads, head_dim]` by cos/sin `[batch, seq, head_dim]`."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return x * cos + rotate_half(x) * sin


def vision_rope(patch_hw: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin `[patches, head_dim]` (float32) for patch (row, col) positions `[patches, 2]`.

    Rows and columns share `head_dim // 4` frequencies; their angles are concatenated and then
    repeated to cover the whole head (no partial rotation).
    """
    inv_freq = jnp.asarray(inverse_frequencies(head_dim // 2, theta))
    freqs = patch_hw.astype(jnp.float32)[..., None] * inv_freq  # [patches, 2, head_dim // 4]
    hw = jnp.concatenate([freqs[:, 0], freqs[:, 1]], axis=-1)
    emb = jnp.concatenate([hw, hw], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_vision_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates `x [patches, heads, head_dim]` in float32 and casts back."""
    x32 = x.astype(jnp.float32)
    out = x32 * cos[:, None, :] + rotate_half(x32) * sin[:, None, :]
    return out.astype(x.dtype)
