"""Qwen3-VL dense (transformers' `Qwen3VLForConditionalGeneration`) as one Flax NNX module.

`forward` is pure array code (jittable, with or without a KV cache). `__call__` is the
transformers-like convenience API: it takes NumPy or JAX arrays, prepares positions on the host
and runs a jitted forward.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreamr_jax.config.schema import ModelConfig
from dreamr_jax.models.inputs import ModelInputs, prepare_inputs, prepare_vision
from dreamr_jax.models.kv_cache import KVCache
from dreamr_jax.models.layers import Linear
from dreamr_jax.models.rope import text_rope
from dreamr_jax.models.text import TextModel, attention, attention_upto
from dreamr_jax.models.vision import VisionModel

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def as_dtype(dtype) -> jnp.dtype:
    return jnp.dtype(DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype)


class Qwen3VL(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype="float32", rngs: nnx.Rngs):
        dtype = as_dtype(dtype)
        self.config = config
        self.dtype = dtype
        self.visual = VisionModel(config.vision, dtype=dtype, rngs=rngs)
        self.language_model = TextModel(config.text, dtype=dtype, rngs=rngs)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else Linear(
                config.text.hidden_size,
                config.text.vocab_size,
                axes=("embed", "vocab"),
                dtype=dtype,
                rngs=rngs,
            )
        )

    # ----------------------------------------------------------------------------- pure arrays

    def image_features(self, vision) -> tuple[jax.Array, jax.Array]:
        """Visual tokens `[tokens, hidden]`, DeepStack features `[n_deepstack, tokens, hidden]`."""
        return self.visual(vision)

    def hidden_states(
        self, inputs: ModelInputs, cache: KVCache | None = None, *, remat: bool = False
    ) -> tuple[jax.Array, KVCache | None]:
        """Final normed hidden states `[batch, t, hidden]`, and the cache with this chunk added.

        Without a cache the chunk attends causally to itself. With one, its tokens go to slots
        `cache.length[b] ...` of each row and attend to every valid earlier slot. With `remat`
        (training, no cache), a backward pass keeps only each decoder layer's input and
        recomputes the layer's inner activations from it.
        """
        if remat and cache is not None:
            raise ValueError("remat is for training passes, which have no cache")
        cfg, text = self.config, self.language_model
        ids, token_mask = inputs.input_ids, inputs.attention_mask.astype(bool)
        x = text.embed_tokens(ids)
        is_image = (ids == cfg.image_token_id) & token_mask
        deepstack, gather = None, None
        if inputs.vision is not None:
            image_embeds, deepstack = self.visual(inputs.vision)
            # Visual tokens fill the image-token slots in row-major order, as masked_scatter does.
            gather = jnp.maximum(jnp.cumsum(is_image.reshape(-1)) - 1, 0).reshape(ids.shape)
            x = jnp.where(is_image[..., None], image_embeds[gather].astype(x.dtype), x)
        cos, sin = text_rope(
            inputs.positions,
            cfg.text.head_dim,
            cfg.text.rope_theta,
            cfg.text.mrope_section,
            x.dtype,
        )

        t = ids.shape[1]
        if cache is None:
            if inputs.chunk_mask is not None:  # a tree of branches (packed judge training)
                mask = inputs.chunk_mask & token_mask[:, None, :]
            else:
                causal = jnp.tril(jnp.ones((t, t), bool))
                mask = causal[None] & token_mask[:, None, :]
            new_cache = None
        else:
            query_slot = cache.length[:, None] + jnp.arange(t)[None, :]  # [batch, t]
            rows = jnp.arange(ids.shape[0])[:, None]
            # Slots past the cache are dropped, as for k and v below: a chunk's right padding
            # needs no room in the cache, only its real tokens do.
            valid = cache.valid.at[rows, query_slot].set(token_mask, mode="drop")
            slots = jnp.arange(cache.max_len)
            mask = valid[:, None, :] & (slots[None, None, :] <= query_slot[..., None])
            if inputs.cache_mask is not None:
                mask = mask & inputs.cache_mask
            if inputs.chunk_mask is not None:
                rel = slots[None, :] - cache.length[:, None]  # [batch, max_len]
                in_chunk = (rel >= 0) & (rel < t)
                index = jnp.broadcast_to(jnp.clip(rel, 0, t - 1)[:, None, :], mask.shape)
                allowed = jnp.take_along_axis(inputs.chunk_mask, index, axis=2)
                mask = jnp.where(in_chunk[:, None, :], allowed & valid[:, None, :], mask)
            new_k, new_v = cache.k, cache.v
            extent = jnp.max(cache.length) + t  # past the last slot any query sees

        def attend_in_chunk(q, k, v):  # keys `[batch, t, kv_heads, head_dim]`: to heads first
            return attention(q, k.swapaxes(1, 2), v.swapaxes(1, 2), mask)

        def add_deepstack(x, i):
            """DeepStack: visual features of the ViT's middle blocks added to the image tokens'
            hidden states after the first decoder layers (layer `i`: an int, or traced in a
            scan, where every layer gathers and the later ones add zeros)."""
            if deepstack is None or (isinstance(i, int) and i >= deepstack.shape[0]):
                return x
            if isinstance(i, int):
                return x + jnp.where(is_image[..., None], deepstack[i][gather].astype(x.dtype), 0)
            feature = deepstack[jnp.minimum(i, deepstack.shape[0] - 1)][gather].astype(x.dtype)
            return x + jnp.where(is_image[..., None] & (i < deepstack.shape[0]), feature, 0)

        def run_layer(layer, i, x, k, v):
            """Decoder layer `i` on x; with a cache, its keys and values written into k, v."""
            if cache is None:
                return add_deepstack(layer(x, cos, sin, attend_in_chunk), i), k, v
            written = {}

            def attend(q, new_keys, new_values):
                # One scatter into the stacked (donated) cache: XLA updates it in place, where
                # slicing out layer i and writing it back copied the whole layer. (Indices split
                # by a slice: the update is `[batch, t, kv_heads, head_dim]`.)
                at = (i, rows, slice(None), query_slot)
                written["k"] = k.at[at].set(new_keys.astype(k.dtype), mode="drop")
                written["v"] = v.at[at].set(new_values.astype(v.dtype), mode="drop")
                return attention_upto(q, written["k"], written["v"], mask, extent, i)

            x = layer(x, cos, sin, attend)
            return add_deepstack(x, i), written["k"], written["v"]

        if cache is None:
            new_k = new_v = None
        if cfg.text.scan_layers:
            graphdef, stacked = nnx.split(text.layers)

            def body(carry, per_layer):
                layer_state, i = per_layer
                return run_layer(nnx.merge(graphdef, layer_state), i, *carry), None

            if remat:  # (no cache under remat) each turn keeps its input, recomputes the rest
                body = jax.checkpoint(body, prevent_cse=False)
            layers = jnp.arange(cfg.text.num_hidden_layers)
            (x, new_k, new_v), _ = jax.lax.scan(body, (x, new_k, new_v), (stacked, layers))
        else:
            # (No cache under remat: every layer attends within the chunk.)
            remat_layer = (
                nnx.remat(lambda layer, x: layer(x, cos, sin, attend_in_chunk)) if remat else None
            )
            for i, layer in enumerate(text.layers):
                if remat_layer is not None:
                    x = add_deepstack(remat_layer(layer, x), i)
                else:
                    x, new_k, new_v = run_layer(layer, i, x, new_k, new_v)

        if cache is not None:
            chunk_max = jnp.max(jnp.where(token_mask, inputs.positions.max(0), -1), axis=1)
            new_cache = KVCache(
                k=new_k,
                v=new_v,
                valid=valid,
                length=cache.length + t,
                next_position=jnp.maximum(cache.next_position, chunk_max + 1),
            )
        return text.norm(x), new_cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """`[..., hidden] -> [..., vocab]` in float32."""
        if self.lm_head is None:
            out = self.language_model.embed_tokens.attend(hidden)
        else:
            out = self.lm_head(hidden)
        return out.astype(jnp.float32)

    def forward(
        self, inputs: ModelInputs, cache: KVCache | None = None
    ) -> tuple[jax.Array, KVCache | None]:
        """Logits `[batch, t, vocab]` (float32) and the updated cache."""
        hidden, cache = self.hidden_states(inputs, cache)
        return self.logits(hidden), cache

    # --------------------------------------------------------------- transformers-like helpers

    def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None):
        """Logits `[batch, seq, vocab]` for NumPy/JAX inputs in the transformers convention."""
        inputs, _ = prepare_inputs(
            self.config, input_ids, attention_mask, pixel_values, image_grid_thw
        )
        graphdef, state = nnx.split(self)
        return _jit_forward(graphdef, state, inputs)

    def get_image_features(self, pixel_values, image_grid_thw) -> tuple[jax.Array, jax.Array]:
        """Merged visual tokens and DeepStack features for packed patches and their grids."""
        vision = prepare_vision(self.config, np.asarray(pixel_values), np.asarray(image_grid_thw))
        graphdef, state = nnx.split(self)
        return _jit_image_features(graphdef, state, vision)


@functools.partial(jax.jit, static_argnums=0)
def _jit_forward(graphdef, state, inputs):
    return nnx.merge(graphdef, state).forward(inputs)[0]


@functools.partial(jax.jit, static_argnums=0)
def _jit_image_features(graphdef, state, vision):
    return nnx.merge(graphdef, state).image_features(vision)
