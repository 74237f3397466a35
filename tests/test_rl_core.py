"""SAPO's algorithmic core against hand-written NumPy references: each reward term and their
weighted sum, the group advantages (degenerate groups included), the clipped-surrogate loss and its
gradient, the registries' errors, and jit.

The references loop over rollouts, steps and tokens in float64 and share no code with the jnp
implementations.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamr_jax.rl import registry
from dreamr_jax.rl.advantages import grpo_advantages, rloo_advantages
from dreamr_jax.rl.losses import grpo_loss
from dreamr_jax.rl.rewards import (
    RewardInputs,
    draft_reward,
    kept_reward,
    length_reward,
    outcome_reward,
    soft_draft_reward,
    total_reward,
)

ALPHA = np.float32(0.7)

# Four rollouts, up to three steps each. Padding holds NaN to prove it is never read.
CORRECT = np.array([True, False, True, False])
STEP_P = np.array(
    [
        [0.9, 0.5, 0.8],
        [0.71, 0.7, np.nan],  # 0.7 is not > alpha: acceptance is strict
        [np.nan, np.nan, np.nan],  # no steps at all (e.g. no delimiter and no final step)
        [0.2, np.nan, np.nan],
    ],
    dtype=np.float32,
)
STEP_MASK = np.array(
    [[True, True, True], [True, True, False], [False, False, False], [True, False, False]]
)
# Steps that are the target's own greedy step: one the judge refused (row 0, step 1), one it
# accepted (row 1, step 0), one it refused in a one-step rollout (row 3); padding set to prove
# it is never read.
STEP_OWN = np.array(
    [[False, True, False], [True, False, True], [True, True, True], [True, False, False]]
)
LENGTHS = np.array([30, 90, 0, 10], dtype=np.int32)
REFERENCE_LENGTHS = np.array([60, 60, 60, 0], dtype=np.int32)  # last: no reference chain


def reward_inputs() -> RewardInputs:
    return RewardInputs(
        correct=jnp.asarray(CORRECT),
        step_p=jnp.asarray(STEP_P),
        step_mask=jnp.asarray(STEP_MASK),
        step_own=jnp.asarray(STEP_OWN),
        lengths=jnp.asarray(LENGTHS),
        reference_lengths=jnp.asarray(REFERENCE_LENGTHS),
        alpha=jnp.asarray(ALPHA),
    )


def reference_rewards() -> dict[str, np.ndarray]:
    """The five terms, rollout by rollout, as the issue (and `kept`'s docstring) states them."""
    terms = {name: [] for name in ("outcome", "draft", "draft_soft", "kept", "length")}
    for i in range(len(CORRECT)):
        real = [j for j in range(STEP_P.shape[1]) if STEP_MASK[i, j]]
        steps = [float(STEP_P[i, j]) for j in real]
        terms["outcome"].append(1.0 if CORRECT[i] else 0.0)
        terms["draft"].append(sum(p > ALPHA for p in steps) / len(steps) if steps else 0.0)
        kept = [STEP_P[i, j] > ALPHA or STEP_OWN[i, j] for j in real]
        terms["kept"].append(sum(kept) / len(kept) if kept else 0.0)
        terms["draft_soft"].append(sum(steps) / len(steps) if steps else 0.0)
        ref = REFERENCE_LENGTHS[i]
        terms["length"].append(1.0 - min(1.0, LENGTHS[i] / ref) if ref > 0 else 0.0)
    return {name: np.array(values) for name, values in terms.items()}


def test_reward_terms_match_hand_computed_values():
    expected = reference_rewards()
    # The hand values themselves, so the reference cannot drift with the code.
    np.testing.assert_allclose(expected["draft"], [2 / 3, 1 / 2, 0.0, 0.0])
    np.testing.assert_allclose(expected["draft_soft"], [2.2 / 3, 1.41 / 2, 0.0, 0.2], rtol=1e-6)
    np.testing.assert_allclose(expected["kept"], [1.0, 1 / 2, 0.0, 1.0])
    np.testing.assert_allclose(expected["length"], [0.5, 0.0, 1.0, 0.0])

    inputs = reward_inputs()
    for name, function in [
        ("outcome", outcome_reward),
        ("draft", draft_reward),
        ("draft_soft", soft_draft_reward),
        ("kept", kept_reward),
        ("length", length_reward),
    ]:
        got = function(inputs)
        assert got.shape == (4,) and got.dtype == jnp.float32, name
        assert np.all(np.isfinite(np.asarray(got))), name
        np.testing.assert_allclose(np.asarray(got), expected[name], rtol=1e-6, err_msg=name)
        assert registry.get("reward", name) is function


def test_rollout_with_no_steps_scores_zero_draft_reward():
    """A rollout with no delimiter that the segmenter leaves stepless, alone in its batch."""
    inputs = RewardInputs(
        correct=jnp.array([True]),
        step_p=jnp.full((1, 4), jnp.nan, jnp.float32),
        step_mask=jnp.zeros((1, 4), bool),
        step_own=jnp.ones((1, 4), bool),
        lengths=jnp.array([12], jnp.int32),
        reference_lengths=jnp.array([48], jnp.int32),
        alpha=0.7,
    )
    np.testing.assert_array_equal(np.asarray(draft_reward(inputs)), [0.0])
    np.testing.assert_array_equal(np.asarray(soft_draft_reward(inputs)), [0.0])
    np.testing.assert_array_equal(np.asarray(kept_reward(inputs)), [0.0])
    total, _ = total_reward(inputs, {"outcome": 1.0, "draft": 1.0, "length": 1.0})
    np.testing.assert_allclose(np.asarray(total), [1.0 + 0.0 + 0.75])


@pytest.mark.parametrize(
    "weights",
    [
        {"outcome": 1.0, "draft": 1.0, "length": 1.0},
        {"outcome": 2.0, "draft_soft": 0.5, "length": 1.0},
        {"outcome": 3.0, "kept": 1.0, "length": 1.0},
        {"draft": 1.0},
    ],
)
def test_total_reward_is_the_weighted_sum(weights):
    expected_terms = reference_rewards()
    expected = sum(weight * expected_terms[name] for name, weight in weights.items())
    total, terms = total_reward(reward_inputs(), weights)
    assert total.shape == (4,) and total.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(total), expected, rtol=1e-6)
    assert set(terms) == set(weights)
    for name in weights:
        np.testing.assert_allclose(np.asarray(terms[name]), expected_terms[name], rtol=1e-6)


def test_total_reward_rejects_unknown_and_empty_weights():
    with pytest.raises(
        ValueError, match=r"unknown reward 'speed'.*draft, draft_soft, kept, length"
    ):
        total_reward(reward_inputs(), {"outcome": 1.0, "speed": 1.0})
    with pytest.raises(ValueError, match="no reward terms"):
        total_reward(reward_inputs(), {})


def test_reward_inputs_are_checked_at_the_boundary():
    inputs = reward_inputs()
    with pytest.raises(AssertionError):  # step mask one step short
        outcome_reward(RewardInputs(**{**vars(inputs), "step_mask": inputs.step_mask[:, :2]}))
    with pytest.raises(AssertionError):  # own-step flags one step short
        kept_reward(RewardInputs(**{**vars(inputs), "step_own": inputs.step_own[:, :2]}))
    with pytest.raises(AssertionError):  # correctness as floats, not bools
        outcome_reward(RewardInputs(**{**vars(inputs), "correct": inputs.correct * 1.0}))


def reference_grpo(rewards: np.ndarray, group_size: int, eps: float = 1e-6) -> np.ndarray:
    out = np.zeros(len(rewards))
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size].astype(np.float64)
        if np.all(group == group[0]):
            continue  # no signal: zero advantage
        out[start : start + group_size] = (group - group.mean()) / (group.std(ddof=1) + eps)
    return out


def reference_rloo(rewards: np.ndarray, group_size: int) -> np.ndarray:
    out = np.zeros(len(rewards))
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size].astype(np.float64)
        if np.all(group == group[0]):
            continue
        for i in range(group_size):
            others = [group[j] for j in range(group_size) if j != i]
            out[start + i] = group[i] - sum(others) / len(others)
    return out


# Three prompts, G = 4; the middle group is degenerate (all rewards 1 + 2/3 + 0.25).
GROUPED_REWARDS = np.array(
    [1.0, 0.0, 2.5, 1.5] + [1.0 + 2 / 3 + 0.25] * 4 + [0.3, 0.3, 0.3, 2.1], dtype=np.float32
)


def test_grpo_advantages_match_hand_computed_values():
    # Group 1 by hand: mean 1.25, sample std sqrt(3.25 / 3).
    std = np.sqrt(3.25 / 3)
    np.testing.assert_allclose(
        reference_grpo(GROUPED_REWARDS, 4)[:4], np.array([-0.25, -1.25, 1.25, 0.25]) / std, 1e-6
    )
    got = grpo_advantages(jnp.asarray(GROUPED_REWARDS), 4)
    assert got.shape == (12,) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), reference_grpo(GROUPED_REWARDS, 4), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got)[4:8], 0.0)  # exactly zero, no NaN
    assert registry.get("advantage", "grpo") is grpo_advantages


def test_rloo_advantages_match_hand_computed_values():
    np.testing.assert_allclose(
        reference_rloo(GROUPED_REWARDS, 4)[:4],
        [1 - 4 / 3, -5 / 3, 2.5 - 2.5 / 3, 1.5 - 3.5 / 3],
        1e-6,
    )
    got = rloo_advantages(jnp.asarray(GROUPED_REWARDS), 4)
    assert got.shape == (12,) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), reference_rloo(GROUPED_REWARDS, 4), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got)[4:8], 0.0)


@pytest.mark.parametrize("estimator", [grpo_advantages, rloo_advantages])
def test_degenerate_groups_give_exact_zero(estimator):
    # In float32 the mean of eight copies of this value is one rounding off the value, and the
    # plain formula turns that residue into an advantage of -0.106 for every rollout.
    equal = jnp.full((16,), 1.0 + 2 / 3 + 0.25, jnp.float32)
    np.testing.assert_array_equal(np.asarray(estimator(equal, 8)), 0.0)
    # G = 1: every group is a single rollout with nothing to compare against.
    np.testing.assert_array_equal(np.asarray(estimator(jnp.asarray(GROUPED_REWARDS), 1)), 0.0)
    # bf16 rewards are accepted and the advantages come back float32.
    assert estimator(equal.astype(jnp.bfloat16), 8).dtype == jnp.float32


def test_advantages_reject_rewards_that_do_not_split_into_groups():
    with pytest.raises(ValueError, match="do not split into groups of 5"):
        grpo_advantages(jnp.asarray(GROUPED_REWARDS), 5)
    with pytest.raises(AssertionError):  # integer rewards
        grpo_advantages(jnp.arange(8), 4)


def reference_loss(policy, old, reference, advantages, mask, epsilon, beta):
    """Token by token, in float64: (loss, kl mean, clip fraction, ratio mean)."""
    losses, kls, clips, ratios = [], [], [], []
    for row in range(policy.shape[0]):
        a = float(advantages[row])
        for t in range(policy.shape[1]):
            if not mask[row, t]:
                continue
            ratio = np.exp(float(policy[row, t]) - float(old[row, t]))
            clipped_ratio = min(max(ratio, 1 - epsilon), 1 + epsilon)
            d = float(reference[row, t]) - float(policy[row, t])
            kl = np.exp(d) - d - 1
            losses.append(-min(ratio * a, clipped_ratio * a) + beta * kl)
            kls.append(kl)
            clips.append((ratio > 1 + epsilon and a > 0) or (ratio < 1 - epsilon and a < 0))
            ratios.append(ratio)
    if not losses:
        return 0.0, 0.0, 0.0, 0.0
    return tuple(float(np.mean(v)) for v in (losses, kls, clips, ratios))


def loss_batch(seed: int = 0):
    """Three rows of six tokens: partial masks, ratios well outside [0.8, 1.2], mixed signs."""
    rng = np.random.default_rng(seed)
    policy = rng.uniform(-3.0, -0.1, (3, 6)).astype(np.float32)
    old = (policy + rng.normal(0.0, 0.4, (3, 6))).astype(np.float32)
    reference = (policy + rng.normal(0.0, 0.5, (3, 6))).astype(np.float32)
    advantages = np.array([1.3, -0.7, 0.0], np.float32)
    mask = np.array(
        [
            [True] * 6,
            [True, True, True, True, False, False],
            [False, True, True, False, False, False],
        ]
    )
    return policy, old, reference, advantages, mask


@pytest.mark.parametrize("epsilon, beta", [(0.2, 1e-3), (0.1, 0.5)])
def test_grpo_loss_matches_hand_computed_values(epsilon, beta):
    policy, old, reference, advantages, mask = loss_batch()
    loss, kl, clip_fraction, ratio_mean = reference_loss(
        policy, old, reference, advantages, mask, epsilon, beta
    )
    assert 0 < clip_fraction < 1  # the batch does exercise both branches of the clip

    got_loss, metrics = grpo_loss(
        *map(jnp.asarray, (policy, old, reference, advantages, mask)), epsilon=epsilon, beta=beta
    )
    assert got_loss.shape == () and got_loss.dtype == jnp.float32
    np.testing.assert_allclose(float(got_loss), loss, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(metrics["kl"]), kl, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["clip_fraction"]), clip_fraction, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["ratio_mean"]), ratio_mean, rtol=1e-5)
    assert registry.get("policy_loss", "grpo") is grpo_loss


def test_on_policy_gradient_is_the_hand_computed_policy_gradient():
    """With old = policy the ratio is 1, so d loss / d policy per unmasked token is
    (-A + beta * (1 - exp(reference - policy))) / N, N the unmasked tokens of the batch; this also
    proves `old` is stop-gradiented (otherwise the ratio's gradient would cancel)."""
    policy, _, reference, advantages, mask = loss_batch()
    beta = 0.1
    expected = np.zeros(policy.shape)
    for row, t in zip(*np.nonzero(mask), strict=True):
        d = float(reference[row, t]) - float(policy[row, t])
        expected[row, t] = (-float(advantages[row]) + beta * (1 - np.exp(d))) / mask.sum()

    def loss_of(policy_logprobs):
        return grpo_loss(
            policy_logprobs,
            policy_logprobs,
            jnp.asarray(reference),
            jnp.asarray(advantages),
            jnp.asarray(mask),
            beta=beta,
        )[0]

    got = jax.grad(loss_of)(jnp.asarray(policy))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-8)


def test_masked_padding_cannot_poison_loss_or_gradient():
    policy, old, reference, advantages, mask = loss_batch()
    # Row 2 becomes all padding, filled with values whose exp overflows or is undefined.
    mask[2] = False
    policy[2] = [-np.inf, 1e4, -1e4, 0.0, np.inf, -np.inf]
    old[2] = [-np.inf, -1e4, 1e4, 0.0, -np.inf, 0.0]
    reference[2] = [0.0, -1e4, 1e4, np.nan, np.inf, 1e4]
    expected_loss = reference_loss(policy, old, reference, advantages, mask, 0.2, 1e-3)[0]

    def loss_of(policy_logprobs):
        return grpo_loss(policy_logprobs, *map(jnp.asarray, (old, reference, advantages, mask)))

    (loss, metrics), grad = jax.value_and_grad(loss_of, has_aux=True)(jnp.asarray(policy))
    np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-5)
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert np.all(np.isfinite(np.asarray(grad)))
    np.testing.assert_array_equal(np.asarray(grad)[2], 0.0)

    # A batch with no unmasked token at all: loss 0, gradient 0, nothing NaN.
    empty = np.zeros_like(mask)
    (loss, metrics), grad = jax.value_and_grad(
        lambda p: grpo_loss(p, *map(jnp.asarray, (old, reference, advantages, empty))),
        has_aux=True,
    )(jnp.asarray(policy))
    assert float(loss) == 0.0 and all(float(v) == 0.0 for v in metrics.values())
    np.testing.assert_array_equal(np.asarray(grad), 0.0)


def test_loss_inputs_are_checked_at_the_boundary():
    policy, old, reference, advantages, mask = map(jnp.asarray, loss_batch())
    with pytest.raises(AssertionError):  # one advantage per token instead of per row
        grpo_loss(policy, old, reference, policy, mask)
    with pytest.raises(AssertionError):  # float mask
        grpo_loss(policy, old, reference, advantages, mask * 1.0)
    with pytest.raises(AssertionError):  # reference one token short
        grpo_loss(policy, old, reference[:, :-1], advantages, mask)


def test_registry_errors_name_the_unknown_key_and_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown advantage 'ppo'; known advantage names: grpo"):
        registry.get("advantage", "ppo")
    with pytest.raises(ValueError, match=r"unknown registry kind 'rewards'.*reward, advantage"):
        registry.get("rewards", "outcome")
    with pytest.raises(ValueError, match="'outcome' is already registered"):
        registry.register("reward", "outcome")(lambda inputs: inputs.correct)
    assert registry.get("reward", "outcome") is outcome_reward  # the failed attempt changed nothing
    assert registry.names("policy_loss") == ("grpo",)


def test_everything_jits_and_matches_eager():
    weights = {"outcome": 1.0, "draft_soft": 1.0, "length": 1.0}
    inputs = reward_inputs()
    jitted_total = jax.jit(lambda x: total_reward(x, weights))(inputs)
    np.testing.assert_allclose(jitted_total[0], total_reward(inputs, weights)[0], rtol=1e-6)

    # alpha is traced: a new threshold reuses the compiled function.
    jitted_draft = jax.jit(draft_reward)
    jitted_draft(inputs)
    lowered_alpha = RewardInputs(**{**vars(inputs), "alpha": jnp.asarray(np.float32(0.5))})
    np.testing.assert_allclose(jitted_draft(lowered_alpha), [2 / 3, 1.0, 0.0, 0.0], 1e-6)
    assert jitted_draft._cache_size() == 1

    rewards = jnp.asarray(GROUPED_REWARDS)
    for estimator in (grpo_advantages, rloo_advantages):
        jitted = jax.jit(estimator, static_argnums=1)(rewards, 4)
        np.testing.assert_allclose(jitted, estimator(rewards, 4), rtol=1e-6)

    batch = tuple(map(jnp.asarray, loss_batch()))
    jitted_loss, jitted_metrics = jax.jit(grpo_loss)(*batch)
    eager_loss, eager_metrics = grpo_loss(*batch)
    np.testing.assert_allclose(jitted_loss, eager_loss, rtol=1e-6)
    for name in eager_metrics:
        np.testing.assert_allclose(jitted_metrics[name], eager_metrics[name], rtol=1e-6)

    # bf16 log-probs (the training dtype) are accepted; the loss comes back float32.
    bf16_batch = [x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x for x in batch]
    assert jax.jit(grpo_loss)(*bf16_batch)[0].dtype == jnp.float32
