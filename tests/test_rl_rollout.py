"""SAPO's rollouts and step scoring on the tiny random pair (tiny_pair.py): shapes and masks,
seeding, the G rows of a prompt, sampled log-probs against teacher forcing (and its gradient),
steps cut where the engine cuts them, and the target's CPN p of every step against the engine's
own tree verification, with the target's parameters left as they were.

The pair is loaded with the step delimiter "e", which ~15% of the tiny vocabulary's tokens hold,
so random chains end steps at delimiters often and not only at the cap; the engine built on the
same pair uses the same stop tokens.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx
from tiny_pair import make_tiny_pair

from dreamr_jax.config.schema import PromptConfig, SpecConfig
from dreamr_jax.data import digitmath
from dreamr_jax.data.digitmath import problem_image
from dreamr_jax.models.sampling import GREEDY, Sampling
from dreamr_jax.rl.rollout import Prompt, RolloutSpec, prompt_rows, rollout, token_logprobs
from dreamr_jax.rl.scoring import score_steps
from dreamr_jax.serve.checkpoints import load_checkpoint
from dreamr_jax.speculative.cpn import cpn_scores
from dreamr_jax.speculative.engine import Engine

DELIMITER = "e"
PROMPTS, GROUP = 2, 4
MAX_NEW_TOKENS, MAX_STEP_TOKENS = 24, 8
SPEC = SpecConfig(max_new_tokens=MAX_NEW_TOKENS, max_step_tokens=MAX_STEP_TOKENS)
VOCAB = 512  # the tiny pair's vocabulary
SAMPLED = Sampling(temperature=1.0)
# A judge made of the random target's next-token distribution after the judge suffix, as in
# test_engine.py: "yes" = the ids that leave 0 divided by 4, "no" = those that leave 1. Its two
# likeliest answers there fall one in each, so p spreads over (0, 1) and the mass varies.
SPLIT = (tuple(range(0, VOCAB, 4)), tuple(range(1, VOCAB, 4)))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    target, draft = make_tiny_pair(str(tmp_path_factory.mktemp("pair")))
    prompt = PromptConfig(step_delimiter=DELIMITER)
    return load_checkpoint(target, prompt), load_checkpoint(draft, prompt)


@pytest.fixture(scope="module")
def engine(pair):
    """The engine over the pair (its runners are the ones rollouts and scoring use)."""
    return Engine(*pair, dataclasses.replace(SPEC, mode="draft"))


@pytest.fixture(scope="module")
def problems():
    return digitmath.generate_problems("test", PROMPTS, 0)


@pytest.fixture(scope="module")
def prompts(pair, problems):
    draft = pair[1]
    return [
        Prompt.of(draft.builder, draft.processor, p.question, [problem_image(p)]) for p in problems
    ]


@pytest.fixture(scope="module")
def draft_rows(pair, prompts):
    return prompt_rows(pair[1].model.config, prompts, GROUP)


def _spec(engine, sampling: Sampling) -> RolloutSpec:
    return RolloutSpec.of(engine.draft, MAX_NEW_TOKENS, MAX_STEP_TOKENS, sampling)


def _rollout(engine, rows, key: int, sampling=SAMPLED):
    runner = engine.draft
    return jax.device_get(
        rollout(runner.graphdef, runner.state, rows, jax.random.key(key), _spec(engine, sampling))
    )


@pytest.fixture(scope="module")
def sampled(engine, draft_rows):
    return _rollout(engine, draft_rows, 0)


def _steps(r, row: int) -> list[list[int]]:
    """Row `row`'s steps as token lists, from its step ends."""
    ends = r.step_ends[row, r.step_mask[row]]
    starts = np.concatenate([[0], ends[:-1]])
    return [r.tokens[row, s:e].tolist() for s, e in zip(starts, ends, strict=True)]


def test_shapes_and_masks(engine, sampled):
    r, rows = sampled, PROMPTS * GROUP
    length, max_steps = MAX_NEW_TOKENS + MAX_STEP_TOKENS - 1, MAX_NEW_TOKENS
    assert r.tokens.shape == r.completion_mask.shape == r.logprobs.shape == (rows, length)
    assert r.step_ends.shape == r.step_mask.shape == (rows, max_steps)
    assert r.lengths.shape == (rows,) and r.logprobs.dtype == np.float32
    positions = np.arange(length)[None]
    np.testing.assert_array_equal(r.completion_mask, positions < r.lengths[:, None])
    assert np.all((r.lengths >= 1) & (r.lengths <= length))
    assert np.all(r.tokens[~r.completion_mask] == engine.draft.pad_id)
    assert np.all(r.logprobs[~r.completion_mask] == 0) and np.all(r.logprobs[r.completion_mask] < 0)
    counts = r.step_mask.sum(axis=1)
    np.testing.assert_array_equal(r.step_mask, np.arange(max_steps)[None] < counts[:, None])
    assert np.all(r.step_ends[~r.step_mask] == 0)
    for row in range(rows):
        ends = r.step_ends[row, : counts[row]]
        assert np.all(np.diff(ends) > 0) and ends[-1] == r.lengths[row]


def test_the_same_key_gives_the_same_rollouts(engine, draft_rows, sampled):
    again, other = _rollout(engine, draft_rows, 0), _rollout(engine, draft_rows, 1)
    for field in dataclasses.fields(sampled):
        np.testing.assert_array_equal(getattr(again, field.name), getattr(sampled, field.name))
    assert not np.array_equal(other.tokens, sampled.tokens)
    # Sampled, the G rows of a prompt are G different chains.
    groups = sampled.tokens.reshape(PROMPTS, GROUP, -1)
    assert all(len({row.tobytes() for row in group}) > 1 for group in groups)


def test_the_g_rows_of_a_prompt_share_it(engine, problems, draft_rows):
    """Greedy, the G rows of a prompt are one chain, the draft's own: the chain and steps the
    engine's `draft` mode writes for the problem."""
    ids = draft_rows.inputs.input_ids.reshape(PROMPTS, GROUP, -1)
    assert all(np.all(group == group[0]) for group in ids)
    r = _rollout(engine, draft_rows, 0, GREEDY)
    for p, problem in enumerate(problems):
        sol = engine.solve(problem.question, [problem_image(problem)])
        for row in range(p * GROUP, (p + 1) * GROUP):
            assert r.tokens[row, : r.lengths[row]].tolist() == sol.tokens
            assert _steps(r, row) == [s.tokens for s in sol.steps]


def test_step_ends_split_the_chain_as_the_engine_does(engine, sampled):
    """Every step ends at a delimiter, EOS or the cap (`Engine.split_steps`), and a row stops
    at the first step end with EOS or with the budget reached."""
    stops, eos = set(engine.draft.stop_ids), set(engine.draft.eos_ids)
    cut_by = set()
    for row in range(PROMPTS * GROUP):
        chain = sampled.tokens[row, : sampled.lengths[row]].tolist()
        steps = _steps(sampled, row)
        assert steps == [s.tokens for s in engine.split_steps(chain)]
        written = np.cumsum([len(step) for step in steps])
        ends_chain = [
            s[-1] in eos or n >= MAX_NEW_TOKENS for s, n in zip(steps, written, strict=True)
        ]
        assert ends_chain == [False] * (len(steps) - 1) + [True]
        cut_by |= {
            "delimiter" if s[-1] in stops else "eos" if s[-1] in eos else "cap" for s in steps
        }
    assert {"delimiter", "cap"} <= cut_by  # both kinds of step end were checked


def test_a_rollout_with_no_delimiter_is_one_step(engine, draft_rows):
    """With no stop token and a cap at the budget, every chain is a single step (never zero:
    every row writes at least one token)."""
    spec = dataclasses.replace(_spec(engine, SAMPLED), stop_ids=(), max_step_tokens=MAX_NEW_TOKENS)
    runner = engine.draft
    r = jax.device_get(rollout(runner.graphdef, runner.state, draft_rows, jax.random.key(0), spec))
    assert np.all(r.step_mask.sum(axis=1) == 1)
    np.testing.assert_array_equal(r.step_ends[:, 0], r.lengths)
    eos = np.isin(r.tokens[np.arange(len(r.lengths)), r.lengths - 1], engine.draft.eos_ids)
    assert np.all(eos | (r.lengths == MAX_NEW_TOKENS))


def test_sampled_logprobs_equal_teacher_forced_ones(pair, draft_rows, sampled):
    """At temperature 1 the log-prob of each drawn token is the model's own, and one plain
    forward pass over prompt + completion gives it again; it is differentiable in the
    parameters (the policy's log-probs inside `jax.grad`)."""
    graphdef, state = nnx.split(pair[1].model)  # as training splits it

    def total(state):
        forced = token_logprobs(
            graphdef, state, draft_rows, sampled.tokens, sampled.completion_mask, SAMPLED
        )
        return forced.sum(), forced

    (_, forced), grads = jax.value_and_grad(total, has_aux=True)(state)
    np.testing.assert_allclose(np.asarray(forced), sampled.logprobs, atol=1e-4, rtol=1e-4)
    grads = jax.tree.leaves(grads)
    assert all(np.all(np.isfinite(g)) for g in grads)
    assert any(np.any(g != 0) for g in grads)


def test_scoring_equals_the_engine_s_verification(pair, engine, problems, prompts, sampled):
    """p and the format mass of every step equal the engine's: its own prompt, the row's steps
    in one `verify_tree` pass, CPN on the verdict logits. The target's parameters are left as
    they were (not donated, not changed)."""
    target = engine.target
    builder = dataclasses.replace(pair[0].builder, positive_ids=SPLIT[0], negative_ids=SPLIT[1])
    before = [np.array(leaf) for leaf in target.state]
    rows = prompt_rows(pair[0].model.config, prompts, GROUP)
    scores = jax.device_get(score_steps(target.graphdef, target.state, rows, sampled, builder))
    assert scores.p.shape == scores.mass.shape == sampled.step_mask.shape
    assert np.all(scores.p[~sampled.step_mask] == 0) and np.all(
        scores.mass[~sampled.step_mask] == 0
    )
    for leaf, was in zip(target.state, before, strict=True):
        assert not leaf.is_deleted()
        np.testing.assert_array_equal(np.asarray(leaf), was)

    slots = int(sampled.step_mask.sum(axis=1).max())  # one verification shape per chunk width
    for row in range(PROMPTS * GROUP):
        problem = problems[row // GROUP]
        _, inputs = engine.prompt(problem.question, [problem_image(problem)])
        steps = _steps(sampled, row)
        # 512 cache slots hold the prompt and the whole tree.
        _, verdicts, greedy, *_ = target.verify_tree(
            target.start(inputs, 512), steps, builder.judge_suffix_ids, slots
        )
        p, mass = jax.device_get(cpn_scores(verdicts, *SPLIT))  # rows past the steps: padding
        k = len(steps)
        np.testing.assert_allclose(scores.p[row, :k], p[:k], atol=1e-4)
        np.testing.assert_allclose(scores.mass[row, :k], mass[:k], atol=1e-4)
        # The target's greedy token before each chain token, step by step.
        greedy, start, own = np.asarray(greedy), 0, []
        for step in steps:
            own.append(greedy[start : start + len(step)].tolist() == step)
            start += len(step)
        np.testing.assert_array_equal(scores.own[row, :k], own)
    assert not scores.own[~sampled.step_mask].any()
    # The judge says yes and no at the default alpha: equal p is not equal saturation.
    p = scores.p[sampled.step_mask]
    assert p.min() < 0.7 < p.max()


def test_the_target_s_own_steps_are_found_word_for_word(pair, engine, prompts):
    """The target's own greedy chains score every step as its own; one token changed in a step
    makes that step not its own and leaves the steps before it so."""
    target = engine.target
    rows = prompt_rows(pair[0].model.config, prompts, 1)
    spec = RolloutSpec.of(target, MAX_NEW_TOKENS, MAX_STEP_TOKENS, GREEDY)
    chains = jax.device_get(rollout(target.graphdef, target.state, rows, jax.random.key(0), spec))
    builder = pair[0].builder
    scores = jax.device_get(score_steps(target.graphdef, target.state, rows, chains, builder))
    assert chains.step_mask.sum(axis=1).min() >= 2
    np.testing.assert_array_equal(scores.own, chains.step_mask)

    changed = dataclasses.replace(chains, tokens=chains.tokens.copy())
    for row in range(len(prompts)):
        start = chains.step_ends[row, 0]  # the second step's first token
        changed.tokens[row, start] = (changed.tokens[row, start] + 1) % VOCAB
    scores = jax.device_get(score_steps(target.graphdef, target.state, rows, changed, builder))
    assert scores.own[:, 0].all() and not scores.own[:, 1].any()
