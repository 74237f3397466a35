"""SAPO's reward terms and their weighted sum.

Every term takes one `RewardInputs` and returns a float32 `[rollouts]` array; terms are registered
by name in the `reward` table, so the config's `name -> weight` mapping picks both the terms and
their weights: `{"outcome": 1, "draft": 1, "length": 1}` is the paper's default, and
`{"outcome": 1, "draft_soft": 1, "length": 1}` swaps in the soft draft term.

- `outcome`: 1 where the final answer is correct, else 0.
- `draft`: the fraction of the rollout's steps the frozen target would accept (CPN p > alpha).
- `draft_soft`: the mean CPN p over the rollout's steps (dense signal, no threshold).
- `kept`: the fraction of the rollout's steps the engine would keep as the draft wrote them: those
  the judge accepts and those that are the target's own greedy step word for word (the engine
  commits those whatever the judge says). `draft` leaves the second kind unrewarded, though the
  engine keeps them as it keeps accepted ones.
- `length`: 1 - min(1, |y| / L_ref), L_ref the length of the target's own greedy chain.

Rollouts with no steps (an empty completion, or one the segmenter gave no step at all) score 0 on
both draft terms: nothing was verified, so nothing earns acceptance credit, and 0 keeps the value
defined where a plain mean would be 0 / 0 = NaN.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import chex
import jax
import jax.numpy as jnp

from dreamr_jax.rl.registry import get, register


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RewardInputs:
    """What is known about each rollout when it is scored. `rollouts` = prompts * G, one row each.

    correct: `[rollouts]` bool, the final answer matches the gold answer.
    step_p: `[rollouts, max_steps]` float, the frozen target's CPN p for each step; entries outside
        `step_mask` are padding and never read (they may hold anything, NaN included).
    step_mask: `[rollouts, max_steps]` bool, True on the rollout's real steps.
    step_own: `[rollouts, max_steps]` bool, the step is the target's own greedy step after the
        rollout's earlier steps, token for token.
    lengths: `[rollouts]` int, |y|: the rollout's completion length in tokens.
    reference_lengths: `[rollouts]` int, L_ref: the length in tokens of the target's own greedy
        chain on the rollout's prompt (repeated for the G rollouts of a prompt).
    alpha: scalar float, the CPN acceptance threshold: a step counts as accepted iff p > alpha.
        A traced leaf, so sweeping it does not recompile.
    """

    correct: jax.Array
    step_p: jax.Array
    step_mask: jax.Array
    step_own: jax.Array
    lengths: jax.Array
    reference_lengths: jax.Array
    alpha: float | jax.Array


@register("reward", "outcome")
def outcome_reward(inputs: RewardInputs) -> jax.Array:
    """R_outcome `[rollouts]` float32: 1 where the final answer is correct, else 0."""
    _check_inputs(inputs)
    return _checked_term(inputs.correct.astype(jnp.float32), inputs)


@register("reward", "draft")
def draft_reward(inputs: RewardInputs) -> jax.Array:
    """R_draft `[rollouts]` float32: the fraction of the rollout's steps with CPN p > alpha
    (strictly greater, the engine's acceptance rule); 0 for a rollout with no steps."""
    _check_inputs(inputs)
    accepted = (inputs.step_p > inputs.alpha).astype(jnp.float32)
    return _checked_term(_mean_over_steps(accepted, inputs.step_mask), inputs)


@register("reward", "draft_soft")
def soft_draft_reward(inputs: RewardInputs) -> jax.Array:
    """R_draft, soft variant, `[rollouts]` float32: the mean CPN p over the rollout's steps; 0 for a
    rollout with no steps."""
    _check_inputs(inputs)
    step_p = inputs.step_p.astype(jnp.float32)
    return _checked_term(_mean_over_steps(step_p, inputs.step_mask), inputs)


@register("reward", "kept")
def kept_reward(inputs: RewardInputs) -> jax.Array:
    """The fraction `[rollouts]` float32 of the rollout's steps the engine keeps as written: CPN
    p > alpha, or the target's own step word for word; 0 for a rollout with no steps."""
    _check_inputs(inputs)
    kept = ((inputs.step_p > inputs.alpha) | inputs.step_own).astype(jnp.float32)
    return _checked_term(_mean_over_steps(kept, inputs.step_mask), inputs)


@register("reward", "length")
def length_reward(inputs: RewardInputs) -> jax.Array:
    """R_length `[rollouts]` float32: 1 - min(1, |y| / L_ref). Shorter than the target's own chain
    earns up to 1, as long or longer earns 0. A row with L_ref <= 0 (no reference chain) earns 0:
    there is nothing to be shorter than, and 0 avoids x / 0."""
    _check_inputs(inputs)
    lengths = inputs.lengths.astype(jnp.float32)
    reference = inputs.reference_lengths.astype(jnp.float32)
    has_reference = reference > 0
    # The inner where keeps the division itself finite, not only the selected result.
    ratio = jnp.where(has_reference, lengths / jnp.where(has_reference, reference, 1.0), 1.0)
    return _checked_term(1.0 - jnp.minimum(1.0, ratio), inputs)


def total_reward(
    inputs: RewardInputs, weights: Mapping[str, float]
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """R = sum over `weights` of weight * term, `[rollouts]` float32, and the unweighted terms by
    name (each `[rollouts]` float32, for metrics). `weights` maps registered reward names to their
    weights; it is plain Python, so close over it (or mark it static) under `jax.jit`."""
    if not weights:
        raise ValueError("no reward terms: weights must name at least one registered reward")
    terms = {name: get("reward", name)(inputs) for name in weights}
    total = sum(float(weight) * terms[name] for name, weight in weights.items())
    return _checked_term(total, inputs), terms


def _mean_over_steps(values: jax.Array, step_mask: jax.Array) -> jax.Array:
    """Mean of `values` `[rollouts, max_steps]` over each row's masked steps -> `[rollouts]`.

    `where` rather than multiplying by the mask, so NaN padding cannot leak in (NaN * 0 = NaN); the
    count is floored at 1, so a row with no steps gives 0 / 1 = 0.
    """
    total = jnp.where(step_mask, values, 0.0).sum(axis=-1)
    num_steps = step_mask.sum(axis=-1)
    return total / jnp.maximum(num_steps, 1)


def _check_inputs(inputs: RewardInputs) -> None:
    chex.assert_rank([inputs.correct, inputs.step_p, inputs.alpha], [1, 2, 0])
    rollouts = inputs.correct.shape[0]
    chex.assert_equal_shape([inputs.step_p, inputs.step_mask, inputs.step_own])
    chex.assert_shape(
        [inputs.step_p, inputs.lengths, inputs.reference_lengths],
        [(rollouts, None), (rollouts,), (rollouts,)],
    )
    chex.assert_type([inputs.correct, inputs.step_mask, inputs.step_own], bool)
    chex.assert_type([inputs.step_p, inputs.alpha], float)
    chex.assert_type([inputs.lengths, inputs.reference_lengths], int)


def _checked_term(term: jax.Array, inputs: RewardInputs) -> jax.Array:
    chex.assert_shape(term, inputs.correct.shape)
    chex.assert_type(term, jnp.float32)
    return term
