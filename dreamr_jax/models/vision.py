"""The Qwen3-VL vision tower: patch embedding, interpolated learned positions, 2D rotary ViT
blocks, the 2x2 patch merger, and the DeepStack mergers whose outputs feed early decoder layers.

All images of a batch are packed into one `[patches, ...]` sequence; attention is block-diagonal
over `segment_ids`, so one compiled function serves any mix of image sizes with the same total.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dreamr_jax.config.schema import VisionConfig
from dreamr_jax.models.inputs import VisionInputs
from dreamr_jax.models.layers import ACTIVATIONS, LayerNorm, Linear, gelu_exact
from dreamr_jax.models.rope import apply_vision_rope, vision_rope


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = Linear(
            d, 3 * d, axes=("vit_embed", "vit_qkv"), use_bias=True, dtype=dtype, rngs=rngs
        )
        self.proj = Linear(
            d, d, axes=("vit_heads", "vit_embed"), use_bias=True, dtype=dtype, rngs=rngs
        )

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        """x `[patches, hidden]`, cos/sin `[patches, head_dim]`, mask `[patches, patches]`."""
        n = x.shape[0]
        qkv = self.qkv(x).reshape(n, 3, self.num_heads, self.head_dim)
        q = apply_vision_rope(qkv[:, 0], cos, sin)
        k = apply_vision_rope(qkv[:, 1], cos, sin)
        v = qkv[:, 2]
        scores = jnp.einsum("qhd,khd->hqk", q, k, preferred_element_type=jnp.float32)
        scores = scores * self.head_dim**-0.5
        scores = jnp.where(mask[None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("hqk,khd->qhd", probs, v).reshape(n, -1)
        return self.proj(out)


class VisionMLP(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        self.linear_fc1 = Linear(
            cfg.hidden_size,
            cfg.intermediate_size,
            axes=("vit_embed", "vit_mlp"),
            use_bias=True,
            dtype=dtype,
            rngs=rngs,
        )
        self.linear_fc2 = Linear(
            cfg.intermediate_size,
            cfg.hidden_size,
            axes=("vit_mlp", "vit_embed"),
            use_bias=True,
            dtype=dtype,
            rngs=rngs,
        )
        self.act = ACTIVATIONS[cfg.hidden_act]

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        eps = cfg.layer_norm_eps
        self.norm1 = LayerNorm(cfg.hidden_size, eps=eps, dtype=dtype, axes=("vit_embed",))
        self.norm2 = LayerNorm(cfg.hidden_size, eps=eps, dtype=dtype, axes=("vit_embed",))
        self.attn = VisionAttention(cfg, dtype=dtype, rngs=rngs)
        self.mlp = VisionMLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, mask):
        x = x + self.attn(self.norm1(x), cos, sin, mask)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """Concatenates each 2x2 block of patches and projects it to the decoder width.

    The main merger normalises every patch before concatenation; the DeepStack mergers normalise
    after it (`postshuffle`), as in transformers.
    """

    def __init__(self, cfg: VisionConfig, *, postshuffle: bool, dtype, rngs: nnx.Rngs):
        self.merged = cfg.hidden_size * cfg.spatial_merge_size**2
        self.postshuffle = postshuffle
        norm_dim = self.merged if postshuffle else cfg.hidden_size
        self.norm = LayerNorm(
            norm_dim, eps=1e-6, dtype=dtype, axes=("vit_merge",) if postshuffle else ("vit_embed",)
        )
        self.linear_fc1 = Linear(
            self.merged,
            self.merged,
            axes=("vit_merge", "vit_mlp"),
            use_bias=True,
            dtype=dtype,
            rngs=rngs,
        )
        self.linear_fc2 = Linear(
            self.merged,
            cfg.out_hidden_size,
            axes=("vit_mlp", "embed"),
            use_bias=True,
            dtype=dtype,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """`[patches, hidden] -> [patches / merge**2, out_hidden]`."""
        if self.postshuffle:
            x = self.norm(x.reshape(-1, self.merged))
        else:
            x = self.norm(x).reshape(-1, self.merged)
        return self.linear_fc2(gelu_exact(self.linear_fc1(x)))


class VisionModel(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        # Conv3d with kernel == stride is a matmul over flattened (C, T, P, P) patches.
        self.patch_embed = Linear(
            cfg.patch_dim,
            cfg.hidden_size,
            axes=("patch", "vit_embed"),
            use_bias=True,
            dtype=dtype,
            rngs=rngs,
        )
        self.pos_embed = nnx.Param(
            (
                0.02
                * jax.random.normal(rngs.params(), (cfg.num_position_embeddings, cfg.hidden_size))
            ).astype(dtype),
            axes=("pos_table", "vit_embed"),
        )
        self.blocks = nnx.List([VisionBlock(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg, postshuffle=False, dtype=dtype, rngs=rngs)
        self.deepstack_merger_list = nnx.List(
            [
                PatchMerger(cfg, postshuffle=True, dtype=dtype, rngs=rngs)
                for _ in cfg.deepstack_visual_indexes
            ]
        )

    def __call__(self, vision: VisionInputs) -> tuple[jax.Array, jax.Array]:
        """Visual token embeddings `[tokens, out_hidden]` and DeepStack features
        `[n_deepstack, tokens, out_hidden]` for packed patches."""
        x = self.patch_embed(vision.pixel_values)
        table = self.pos_embed[...]
        pos = jnp.take(table, vision.interp_index, axis=0)  # [patches, 4, hidden]
        x = x + jnp.sum(pos * vision.interp_weight[..., None].astype(pos.dtype), axis=1)
        cos, sin = vision_rope(vision.patch_hw, self.cfg.head_dim, self.cfg.rope_theta)
        mask = vision.segment_ids[:, None] == vision.segment_ids[None, :]
        deepstack = []
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, mask)
            if i in self.cfg.deepstack_visual_indexes:
                merger = self.deepstack_merger_list[self.cfg.deepstack_visual_indexes.index(i)]
                deepstack.append(merger(x))
        merged = self.merger(x)
        if not deepstack:
            return merged, jnp.zeros((0, *merged.shape), merged.dtype)
        return merged, jnp.stack(deepstack)
