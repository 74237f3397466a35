"""The shipped DigitMath pair: it loads (ours and transformers'), answers a fixed test problem,
and the engine's exactness invariants hold on it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hf_reference import TOL, Prompt, hf_logits, load_hf, max_abs, our_logits

from dreamr_jax.config.schema import FALLBACKS, PromptConfig, SpecConfig
from dreamr_jax.data import digitmath
from dreamr_jax.data.digitmath import problem_image
from dreamr_jax.models.processor import process_images
from dreamr_jax.serve.checkpoints import DEFAULT_DRAFT, DEFAULT_TARGET, load_checkpoint
from dreamr_jax.speculative.engine import Engine
from dreamr_jax.train.evaluate import greedy_solve

FIXED_PROBLEM = 2  # test-00002 (row_sum): the first test problem the draft also gets right


@pytest.mark.parametrize("path", [DEFAULT_TARGET, DEFAULT_DRAFT], ids=["target", "draft"])
def test_shipped_model_answers_a_fixed_problem(path):
    loaded = load_checkpoint(path, PromptConfig())
    problem = digitmath.generate_problems("test", FIXED_PROBLEM + 1, 0)[FIXED_PROBLEM]
    [result] = greedy_solve(
        loaded.model,
        loaded.builder,
        loaded.processor,
        [problem],
        batch_size=1,
        max_new_tokens=160,
        progress=False,
    )
    assert result["correct"], result["output"]
    # Each model writes its own mix of wordings: every step is a correct wording of the gold one.
    steps = result["output"].split(digitmath.STEP_DELIMITER)
    assert len(steps) == len(problem.steps), result["output"]
    assert all(digitmath.is_correct_step(problem, i, s) for i, s in enumerate(steps)), steps


def test_shipped_target_in_transformers_has_our_logits():
    loaded = load_checkpoint(DEFAULT_TARGET, PromptConfig())
    problem = digitmath.generate_problems("test", 1, 0)[0]
    pixel_values, grid = process_images(loaded.processor, [problem_image(problem)])
    ids = loaded.builder.prompt_ids(problem.question, [grid[0].tolist()])
    ids = np.asarray([ids + loaded.builder.steps_ids(problem.steps, complete=True)])
    prompt = Prompt(ids, np.ones_like(ids, bool), pixel_values, grid)
    want = hf_logits(load_hf(str(DEFAULT_TARGET)), loaded.model.config, prompt)
    assert max_abs(our_logits(loaded.model, prompt), want) < TOL


N_INVARIANT = 8  # test problems, each through six engines (three of them host loops)


@pytest.fixture(scope="module")
def shipped_pair():
    prompt = PromptConfig()
    return load_checkpoint(DEFAULT_TARGET, prompt), load_checkpoint(DEFAULT_DRAFT, prompt)


def _outputs(pair, problems, **spec):
    engine = Engine(*pair, dataclasses.replace(SpecConfig(), **spec))
    return [engine.solve(p.question, [problem_image(p)]) for p in problems]


def test_shipped_pair_sd_exact_and_dreamr_alpha1_reproduce_target(shipped_pair):
    """DESIGN.md section 2's invariants on the real pair: greedy sd, exact, and dreamr with a
    judge that accepts nothing (alpha = 1, every fallback), write exactly the target's tokens on
    8 test problems (test_engine.py holds them on tiny pairs in every mode)."""
    problems = digitmath.generate_problems("test", N_INVARIANT, 0)
    want = [s.tokens for s in _outputs(shipped_pair, problems, mode="target")]
    sd = _outputs(shipped_pair, problems, mode="sd")
    assert [s.tokens for s in sd] == want
    assert sum(s.accepted for s in sd) > 0  # the draft's tokens really were used
    assert [s.tokens for s in _outputs(shipped_pair, problems, mode="exact")] == want
    for fallback in FALLBACKS:
        dreamr = _outputs(shipped_pair, problems, mode="dreamr", alpha=1.0, fallback=fallback)
        assert [s.tokens for s in dreamr] == want, fallback


def test_shipped_pair_dreamr_device_loop_commits_what_the_host_loop_commits(shipped_pair):
    """At the shipped default (alpha 0.7, resume), with the trained judge: dreamr's device loop
    and its host loop commit the same chains, counters and step records on 20 test problems."""
    problems = digitmath.generate_problems("test", 20, 0)
    device = Engine(*shipped_pair, SpecConfig())
    host = Engine(*shipped_pair, SpecConfig(), host_loop=True)
    assert device.device_loop and not host.device_loop
    accepted = proposed = 0
    for p in problems:
        got = device.solve(p.question, [problem_image(p)])
        want = host.solve(p.question, [problem_image(p)])
        assert got.tokens == want.tokens
        counters = (want.proposed, want.accepted, want.format_misses)
        assert (got.proposed, got.accepted, got.format_misses) == counters
        records = [
            [(s.text, s.author, s.committed, s.accepted) for s in x.steps] for x in (got, want)
        ]
        assert records[0] == records[1]
        accepted, proposed = accepted + want.accepted, proposed + want.proposed
    assert 0 < accepted < proposed  # the judge's word was taken, both ways
