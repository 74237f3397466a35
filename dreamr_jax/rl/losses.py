"""Policy losses: per-token log-probabilities and per-rollout advantages -> a scalar loss.

Every loss takes the policy's log-probs of the sampled tokens `[rows, T]`, the same under the
policy that sampled them ("old") and under the frozen reference (the SFT draft), advantages
`[rows]`, and the completion mask `[rows, T]` (True on the rollout's own tokens, False on prompt
and padding), and returns (loss: float32 scalar, metrics: dict of float32 scalars). Losses are
registered by name in the `policy_loss` table; their hyperparameters are keyword arguments.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from dreamr_jax.rl.registry import register


@register("policy_loss", "grpo")
def grpo_loss(
    policy_logprobs: jax.Array,
    old_logprobs: jax.Array,
    reference_logprobs: jax.Array,
    advantages: jax.Array,
    completion_mask: jax.Array,
    *,
    epsilon: float = 0.2,
    beta: float = 1e-3,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The clipped surrogate plus beta times the KL to the reference, as a token mean.

    Per token, with ratio = exp(policy - old) and A the rollout's advantage:
        loss = -min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon) * A) + beta * kl,
        kl = exp(reference - policy) - (reference - policy) - 1,
    the k3 estimator of KL(policy || reference): unbiased for tokens sampled from the policy, and
    never negative, unlike the plain log-ratio. The loss is the mean over all unmasked tokens of
    the batch (every token weighs the same, so long rollouts are not down-weighted as they are by a
    per-rollout mean first); a batch with no unmasked token gives 0.

    `old_logprobs` and `reference_logprobs` are constants of the update and are stop-gradiented
    here, so on-policy training (one update per batch) may pass `old_logprobs=policy_logprobs`:
    the ratio is then 1 in value and its gradient is the policy gradient.

    Shapes: logprobs `[rows, T]` (any float dtype; computed in float32), advantages `[rows]`,
    completion_mask `[rows, T]` bool. Metrics, all over unmasked tokens: `kl` (mean k3),
    `clip_fraction` (the fraction whose gradient the clip removes: ratio > 1 + epsilon with A > 0,
    or ratio < 1 - epsilon with A < 0), `ratio_mean`.
    """
    chex.assert_rank(policy_logprobs, 2)
    chex.assert_equal_shape([policy_logprobs, old_logprobs, reference_logprobs, completion_mask])
    chex.assert_shape(advantages, policy_logprobs.shape[:1])
    chex.assert_type([policy_logprobs, old_logprobs, reference_logprobs, advantages], float)
    chex.assert_type(completion_mask, bool)

    policy = policy_logprobs.astype(jnp.float32)
    old = jax.lax.stop_gradient(old_logprobs.astype(jnp.float32))
    reference = jax.lax.stop_gradient(reference_logprobs.astype(jnp.float32))
    advantage = advantages.astype(jnp.float32)[:, None]

    # Log-differences are zeroed off the mask *before* exp: padding may hold anything (-inf, huge
    # values), and exp of it would give inf, whose gradient times a zero mask is NaN.
    log_ratio = jnp.where(completion_mask, policy - old, 0.0)
    reference_minus_policy = jnp.where(completion_mask, reference - policy, 0.0)

    ratio = jnp.exp(log_ratio)
    clipped_ratio = jnp.clip(ratio, 1.0 - epsilon, 1.0 + epsilon)
    surrogate = jnp.minimum(ratio * advantage, clipped_ratio * advantage)
    kl = jnp.exp(reference_minus_policy) - reference_minus_policy - 1.0
    per_token_loss = -surrogate + beta * kl

    num_tokens = jnp.maximum(completion_mask.sum(), 1).astype(jnp.float32)

    def token_mean(values: jax.Array) -> jax.Array:
        return jnp.where(completion_mask, values, 0.0).sum() / num_tokens

    # Where min() picks the clipped branch with a constant ratio, the token's gradient is zero.
    clipped_high = (ratio > 1.0 + epsilon) & (advantage > 0)
    clipped_low = (ratio < 1.0 - epsilon) & (advantage < 0)
    clipped = clipped_high | clipped_low
    loss = token_mean(per_token_loss)
    metrics = {
        "kl": token_mean(kl),
        "clip_fraction": token_mean(clipped.astype(jnp.float32)),
        "ratio_mean": token_mean(ratio),
    }
    chex.assert_shape([loss, *metrics.values()], ())
    chex.assert_type([loss, *metrics.values()], jnp.float32)
    return loss, metrics
