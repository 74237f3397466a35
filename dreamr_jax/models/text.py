"""The Qwen3 decoder of Qwen3-VL: RMSNorm, q/k-norm GQA attention with interleaved M-RoPE,
SwiGLU MLP, DeepStack visual features added after the first decoder layers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dreamr_jax.config.schema import TextConfig
from dreamr_jax.models.layers import Embed, Linear, RMSNorm
from dreamr_jax.models.rope import apply_rope


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention.

    q `[batch, t, heads, head_dim]`, k/v `[batch, kv_heads, keys, head_dim]` (the KV cache's
    layout), mask `[batch, t, keys]` bool. Scores and softmax in float32. Returns
    `[batch, t, heads * head_dim]`.

    The keys are the left operand of the scores product and the values the right one of the
    output product, the operand layouts XLA's CPU matmul takes as they are. As einsums over
    `[batch, keys, kv_heads, head_dim]`, XLA transposed a copy of every layer's cache for every
    decoded token: work that grew with the cache's slots and was most of a small model's
    decode time. (Training, without a cache, is no slower this way.)
    """
    b, t, h, d = q.shape
    kvh, keys = k.shape[1], k.shape[2]
    g = h // kvh
    rows = q.reshape(b, t, kvh, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kvh, g * t, d)
    scores = jnp.matmul(k, rows.swapaxes(-1, -2), preferred_element_type=jnp.float32)
    scores = scores.swapaxes(-1, -2).reshape(b, kvh, g, t, keys) * d**-0.5
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.matmul(probs.reshape(b, kvh, g * t, keys), v)  # [batch, kv_heads, g * t, d]
    return out.reshape(b, kvh, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h * d)


def attention_upto(q, k, v, mask, extent, layer: int, block: int = 128) -> jax.Array:
    """`attention` of one layer of a stacked cache (k, v `[layers, batch, kv_heads, slots,
    head_dim]`) over its first slots only: the smallest multiple of `block` slots holding
    `extent` (a traced scalar, the highest slot any query sees, plus one).

    Slots past `extent` are masked out for every query, so they add exact zeros, but reading
    them costs as much as reading the used ones: with the shipped DigitMath pair's 384-slot
    caches (rarely more than 170 in use) the target alone ran 17% faster this way and dreamr
    11% (same-process A/B on 80 problems). The cut is a `lax.switch` over the few block
    counts: one program, each call paying for the blocks it uses. The branches take the whole
    stack and slice it themselves: a layer sliced out before the switch is a copy of that
    layer for every call (that doubled the target's decode time).
    """
    keys = k.shape[3]
    sizes = [min(keys, block * (j + 1)) for j in range(-(-keys // block))]
    if len(sizes) == 1:
        return attention(q, k[layer], v[layer], mask)

    def first(n):
        def attend(q, k, v, mask):
            return attention(q, k[layer, :, :, :n], v[layer, :, :, :n], mask[..., :n])

        return attend

    index = jnp.clip((extent - 1) // block, 0, len(sizes) - 1)
    return jax.lax.switch(index, [first(n) for n in sizes], q, k, v, mask)


class TextAttention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        d, hd = cfg.hidden_size, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = Linear(
            d,
            cfg.num_attention_heads * hd,
            axes=("embed", "heads"),
            use_bias=bias,
            dtype=dtype,
            rngs=rngs,
        )
        self.k_proj = Linear(
            d,
            cfg.num_key_value_heads * hd,
            axes=("embed", "kv_heads"),
            use_bias=bias,
            dtype=dtype,
            rngs=rngs,
        )
        self.v_proj = Linear(
            d,
            cfg.num_key_value_heads * hd,
            axes=("embed", "kv_heads"),
            use_bias=bias,
            dtype=dtype,
            rngs=rngs,
        )
        self.o_proj = Linear(
            cfg.num_attention_heads * hd,
            d,
            axes=("heads", "embed"),
            use_bias=bias,
            dtype=dtype,
            rngs=rngs,
        )
        self.q_norm = RMSNorm(hd, eps=cfg.rms_norm_eps, dtype=dtype, axes=("head_dim",))
        self.k_norm = RMSNorm(hd, eps=cfg.rms_norm_eps, dtype=dtype, axes=("head_dim",))

    def __call__(self, x, cos, sin, attend):
        """x `[batch, t, hidden]`; `attend(q, k, v) -> [batch, t, heads * head_dim]` attends the
        queries to the new keys and values in their context (the cache, or just this sequence).
        """
        b, t, _ = x.shape
        hd = self.cfg.head_dim
        q = self.q_norm(self.q_proj(x).reshape(b, t, -1, hd))
        k = self.k_norm(self.k_proj(x).reshape(b, t, -1, hd))
        v = self.v_proj(x).reshape(b, t, -1, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return self.o_proj(attend(q, k, v))


class TextMLP(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs):
        d, m = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(d, m, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.up_proj = Linear(d, m, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.down_proj = Linear(m, d, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = TextAttention(cfg, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.mlp = TextMLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, attend):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attend)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nnx.Module):
    """Token embeddings, decoder layers and the final norm (transformers' `Qwen3VLTextModel`)."""

    def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens = Embed(
            cfg.vocab_size, cfg.hidden_size, axes=("vocab", "embed"), dtype=dtype, rngs=rngs
        )
        # Made one by one in both layouts, so a seed gives the same weights either way.
        layers = [DecoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_hidden_layers)]
        self.layers = stack_layers(layers) if cfg.scan_layers else nnx.List(layers)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)


def stack_layers(layers: list[DecoderLayer]) -> DecoderLayer:
    """One `DecoderLayer` whose every parameter is the layers' stacked `[layers, ...]`, its
    logical axes led by `layers` (`lax.scan` runs it, one layer a turn)."""
    graphdef, _ = nnx.split(layers[0])
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(nnx.state(layer) for layer in layers))

    def lead(variable):
        axes = variable.get_metadata().get("axes")
        return variable.replace(axes=("layers", *axes)) if axes is not None else variable

    stacked = jax.tree.map(lead, stacked, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, stacked)
