"""Basic layers with logical-axis metadata (`axes`) on every parameter.

Parameter names and layouts follow transformers where that costs nothing (`weight` for norms and
embeddings), so the checkpoint mapping in `hf_io.py` stays a table; linear kernels are stored
`[in, out]` (the transpose of torch's `[out, in]`) so the forward pass is `x @ kernel`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], dtype, std: float = 0.02) -> jax.Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class Linear(nnx.Module):
    """`y = x @ kernel + bias`, kernel `[in_features, out_features]`."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: Axes,
        use_bias: bool = False,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.kernel = nnx.Param(_normal(rngs, (in_features, out_features), dtype), axes=axes)
        self.bias = (
            nnx.Param(jnp.zeros((out_features,), dtype), axes=(axes[1],)) if use_bias else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        y = jnp.dot(x.astype(kernel.dtype), kernel)
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class Embed(nnx.Module):
    """Token embedding table `weight [vocab, dim]`; `attend` gives tied output logits."""

    def __init__(self, num_embeddings: int, features: int, *, axes: Axes, dtype, rngs: nnx.Rngs):
        self.weight = nnx.Param(_normal(rngs, (num_embeddings, features), dtype), axes=axes)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], ids, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        """`[..., dim] -> [..., vocab]` logits against the embedding table."""
        weight = self.weight[...]
        return jnp.dot(x.astype(weight.dtype), weight.T)


class RMSNorm(nnx.Module):
    """Qwen3 RMSNorm: normalise in float32, cast back, then scale (the order transformers uses)."""

    def __init__(self, dim: int, *, eps: float, dtype, axes: Axes = ("norm",)):
        self.weight = nnx.Param(jnp.ones((dim,), dtype), axes=axes)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * x32.astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with weight and bias (the vision tower's norm), statistics in float32."""

    def __init__(self, dim: int, *, eps: float, dtype, axes: Axes = ("norm",)):
        self.weight = nnx.Param(jnp.ones((dim,), dtype), axes=axes)
        self.bias = nnx.Param(jnp.zeros((dim,), dtype), axes=axes)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (
            y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        ).astype(x.dtype)


def gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


def gelu_exact(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)


ACTIVATIONS = {"gelu_pytorch_tanh": gelu_tanh, "gelu": gelu_exact, "silu": jax.nn.silu}
