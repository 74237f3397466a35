"""Continuous batching (`speculative/batch.py`) on the tiny random pair: requests answered in a
batch of rows, refilled as rows finish, commit what they commit one at a time, in every
device-loop mode (sd included); a host-loop mode refuses to batch."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from tiny_pair import MIXED, load_near_target, make_tiny_pair, solve_in_batch, with_judge

from dreamr_jax.config.schema import PromptConfig, SpecConfig
from dreamr_jax.data import digitmath
from dreamr_jax.data.digitmath import problem_image
from dreamr_jax.serve.checkpoints import load_checkpoint
from dreamr_jax.speculative.batch import RowBatch
from dreamr_jax.speculative.engine import Engine

SPEC = SpecConfig(max_new_tokens=40, max_step_tokens=8)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    target, draft = make_tiny_pair(str(tmp_path_factory.mktemp("pair")))
    return load_checkpoint(target, PromptConfig()), load_checkpoint(draft, PromptConfig())


@pytest.fixture(scope="module")
def near_target(pair):
    return load_near_target(pair[0].path)


@pytest.fixture(scope="module")
def problems():
    return digitmath.generate_problems("test", 10, 0)


def _chain(sol) -> tuple:
    steps = [(s.text, s.author, s.accepted, s.committed, s.p is None) for s in sol.steps]
    counters = (sol.proposed, sol.accepted, sol.target_calls, sol.format_misses)
    return sol.tokens, steps, counters


@pytest.mark.parametrize(
    "draft, spec",
    [
        ("draft", {"mode": "target"}),
        ("draft", {"mode": "draft"}),
        ("draft", {"mode": "exact"}),
        ("near-target", {"mode": "exact"}),
        ("near-target", {"mode": "sd"}),
        ("near-target", {"mode": "dreamr", "alpha": 0.5}),
        ("draft", {"mode": "dreamr", "alpha": 0.5, "draft_confidence": 0.0}),
    ],
    ids=["target", "draft", "exact", "exact-near", "sd-near", "dreamr-near-0.5", "dreamr-0.5"],
)
def test_a_batch_commits_what_one_request_at_a_time_commits(
    pair, near_target, problems, draft, spec
):
    """Rows at different steps, refilled mid-flight (4 rows, 10 problems), against a batch of
    one: the same chains, step records and counters, with a judge that accepts some steps and
    refuses others (`MIXED`). The tiny pair's logits are peaked, so no verdict or greedy choice
    here is a near-tie that batching's arithmetic could flip."""
    drafts = {"draft": pair[1], "near-target": near_target}
    engine = with_judge(Engine(pair[0], drafts[draft], dataclasses.replace(SPEC, **spec)), MIXED)
    alone = [engine.solve(p.question, [problem_image(p)]) for p in problems]
    together = solve_in_batch(engine, problems, rows=4)
    assert [_chain(s) for s in together] == [_chain(s) for s in alone]
    for a, b in zip(alone, together, strict=True):
        p_alone = [s.p for s in a.steps if s.p is not None]
        p_together = [s.p for s in b.steps if s.p is not None]
        np.testing.assert_allclose(p_together, p_alone, atol=1e-5)
    if spec["mode"] == "dreamr":  # the judge decided something: accepted and refused steps
        steps = [s for sol in alone for s in sol.steps if s.p is not None]
        assert any(s.accepted for s in steps) and not all(s.accepted for s in steps)


def test_a_host_loop_mode_refuses_to_batch(pair):
    engine = Engine(*pair, dataclasses.replace(SPEC, mode="dreamr", fallback="lazy"))
    with pytest.raises(ValueError, match="host loop.*device-loop mode"):
        RowBatch(engine, 4)
