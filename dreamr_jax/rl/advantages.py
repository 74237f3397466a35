"""Advantage estimators: per-rollout rewards -> per-rollout advantages, computed within groups.

Every estimator takes rewards `[prompts * G]`, the G rollouts of a prompt on consecutive rows
(prompt-major), and the static `group_size` G, and returns float32 advantages of the same shape.
They are registered by name in the `advantage` table.

A group whose rewards are all equal carries no signal about which rollout was better, so its
advantages are exactly 0. This is enforced with an explicit equality test rather than left to the
arithmetic: the group mean of equal float32 values need not equal them exactly, and dividing the
rounding residue by a standard deviation of the same tiny size would turn it into an advantage of
order one. A group of one rollout (G = 1) is such a group.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from dreamr_jax.rl.registry import register


@register("advantage", "grpo")
def grpo_advantages(rewards: jax.Array, group_size: int, eps: float = 1e-6) -> jax.Array:
    """GRPO's group-normalised advantage `[prompts * G]` float32: (r - group mean) / (group std +
    eps), the std with Bessel's correction (ddof = 1, as the GRPO implementations use); 0 across a
    group of equal rewards."""
    grouped = _grouped(rewards, group_size)
    centered = grouped - grouped.mean(axis=-1, keepdims=True)
    # max(G - 1, 1) only keeps G = 1 away from 0 / 0; such a group is zeroed below anyway.
    variance = jnp.square(centered).sum(axis=-1, keepdims=True) / max(group_size - 1, 1)
    advantages = centered / (jnp.sqrt(variance) + eps)
    return _flattened(jnp.where(_all_equal(grouped), 0.0, advantages), rewards)


@register("advantage", "rloo")
def rloo_advantages(rewards: jax.Array, group_size: int) -> jax.Array:
    """REINFORCE leave-one-out advantage `[prompts * G]` float32: r minus the mean of the other
    G - 1 rewards of its group (a baseline independent of the rollout itself, not rescaled); 0
    across a group of equal rewards, and so for G = 1, which has no other rollouts."""
    grouped = _grouped(rewards, group_size)
    others_mean = (grouped.sum(axis=-1, keepdims=True) - grouped) / max(group_size - 1, 1)
    return _flattened(jnp.where(_all_equal(grouped), 0.0, grouped - others_mean), rewards)


def _grouped(rewards: jax.Array, group_size: int) -> jax.Array:
    """rewards `[prompts * G]` -> float32 `[prompts, G]`, after checking the boundary."""
    chex.assert_rank(rewards, 1)
    chex.assert_type(rewards, float)
    if group_size < 1 or rewards.shape[0] % group_size:
        raise ValueError(
            f"{rewards.shape[0]} rewards do not split into groups of {group_size} rollouts"
        )
    return rewards.astype(jnp.float32).reshape(-1, group_size)


def _all_equal(grouped: jax.Array) -> jax.Array:
    """`[prompts, 1]` bool: True where every reward of the group is the same."""
    return grouped.max(axis=-1, keepdims=True) == grouped.min(axis=-1, keepdims=True)


def _flattened(advantages: jax.Array, rewards: jax.Array) -> jax.Array:
    advantages = advantages.reshape(-1)
    chex.assert_shape(advantages, rewards.shape)
    chex.assert_type(advantages, jnp.float32)
    return advantages
