"""The host loop's schedules and draft and target on devices of their own, on the tiny random
pair with a judge that accepts some steps and refuses others: drafting the next window ahead
(`fpsr`) commits what the synchronous window commits, and models on disjoint submeshes (the
target's weights sharded over its own) commit what one device commits."""

from __future__ import annotations

import dataclasses

import jax
import pytest
from tiny_pair import MIXED, load_near_target, make_tiny_pair, with_judge

from dreamr_jax.config.schema import PromptConfig, SpecConfig
from dreamr_jax.data import digitmath
from dreamr_jax.data.digitmath import problem_image
from dreamr_jax.parallel.mesh import make_mesh
from dreamr_jax.serve.checkpoints import load_checkpoint
from dreamr_jax.speculative.engine import Engine

SPEC = SpecConfig(max_new_tokens=40, max_step_tokens=8, alpha=0.5)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return make_tiny_pair(str(tmp_path_factory.mktemp("pair")))


@pytest.fixture(scope="module")
def pair(paths):
    return tuple(load_checkpoint(p, PromptConfig()) for p in paths)


@pytest.fixture(scope="module")
def near(paths):
    """A draft that agrees with the target now and then (`load_near_target`)."""
    return load_near_target(paths[0])


@pytest.fixture(scope="module")
def apart(paths):
    """Of the 8 fake CPU devices: the target on devices 2-3, its weights sharded over them
    (tensor parallel), and the draft (`near`'s weights) on devices 0-1."""
    devices = jax.devices()
    target = load_checkpoint(
        paths[0], PromptConfig(), mesh=make_mesh(1, 1, -1, devices=devices[2:4])
    )
    draft = load_near_target(paths[0], mesh=make_mesh(1, 1, -1, devices=devices[:2]))
    return target, draft


@pytest.fixture(scope="module")
def problems():
    return digitmath.generate_problems("test", 6, 0)


def _solve(engine: Engine, problems) -> list[tuple]:
    """Each problem's chain, step records and counters (CPN p rounded: float noise aside)."""
    out = []
    for p in problems:
        sol = engine.solve(p.question, [problem_image(p)])
        steps = [
            (s.text, s.author, s.committed, s.accepted, None if s.p is None else round(s.p, 4))
            for s in sol.steps
        ]
        out.append((sol.tokens, steps, sol.proposed, sol.accepted, sol.format_misses))
    return out


@pytest.mark.parametrize(
    "spec",
    [
        {"mode": "exact", "window": 1},
        {"mode": "dreamr", "fallback": "resume"},
        {"mode": "dreamr", "fallback": "lazy"},
        {"mode": "dreamr", "fallback": "eager"},
        {"mode": "dreamr", "fallback": "lazy", "temperature": 0.7},
    ],
    ids=["exact", "dreamr-resume", "dreamr-lazy", "dreamr-eager", "dreamr-sampled"],
)
def test_drafting_ahead_commits_what_the_synchronous_window_commits(pair, near, problems, spec):
    """`fpsr` drafts the next window before the verdicts on this one are read and drops it when
    a step is not kept; the draft at confidence 0 always writes W steps, so windows with every
    step kept and windows with a refused one both occur (for `exact`, which keeps only the
    target's own steps, with a draft that agrees with the target now and then, a step a
    window)."""
    spec = dataclasses.replace(SPEC, draft_confidence=0.0, **spec)
    draft = near if spec.mode == "exact" else pair[1]
    window = with_judge(Engine(pair[0], draft, spec, host_loop=True), MIXED)
    fpsr = with_judge(Engine(pair[0], draft, dataclasses.replace(spec, schedule="fpsr")), MIXED)
    assert not fpsr.device_loop
    calls = {"draft_window": 0, "dispatch_window": 0, "undo_window": 0}
    for name in calls:  # count the windows drafted ahead, and those dropped
        method = getattr(fpsr, name)

        def counted(*args, _method=method, _name=name, **kwargs):
            calls[_name] += 1
            return _method(*args, **kwargs)

        setattr(fpsr, name, counted)
    want, got = _solve(window, problems), _solve(fpsr, problems)
    assert got == want
    ahead = calls["dispatch_window"] - calls["draft_window"]
    assert ahead > calls["undo_window"] > 0, calls  # windows drafted ahead: used, and dropped
    if spec.mode == "dreamr":
        accepted = sum(w[3] for w in want)
        refused = sum(s[1] == "draft" and not s[2] for w in want for s in w[1])
        assert accepted and refused


def test_the_sequential_schedule_drafts_one_step_at_a_time(pair, problems):
    spec = dataclasses.replace(SPEC, mode="dreamr", fallback="lazy", draft_confidence=0.0)
    sequential = with_judge(Engine(*pair, dataclasses.replace(spec, schedule="sequential")), MIXED)
    one = with_judge(Engine(*pair, dataclasses.replace(spec, window=1), host_loop=True), MIXED)
    got, want = _solve(sequential, problems), _solve(one, problems)
    assert got == want
    four = _solve(with_judge(Engine(*pair, spec, host_loop=True), MIXED), problems)
    assert [g[2] for g in got] != [f[2] for f in four]  # W = 4 drafts other steps


@pytest.mark.parametrize(
    "spec",
    [
        {"mode": "target"},
        {"mode": "exact"},
        {"mode": "dreamr"},
        {"mode": "dreamr", "schedule": "fpsr", "fallback": "eager"},
    ],
    ids=["target", "exact", "dreamr", "dreamr-fpsr-eager"],
)
def test_models_on_submeshes_of_their_own_commit_what_one_device_commits(
    pair, near, apart, problems, spec
):
    """Draft and target on disjoint submeshes against both on one device (where `exact` and
    `dreamr` run the device loop; apart, the host loop)."""
    devices = jax.devices()
    spec = dataclasses.replace(SPEC, **spec)
    engine = with_judge(Engine(*apart, spec), MIXED)
    together = with_judge(Engine(pair[0], near, spec), MIXED)
    assert engine.apart and not together.apart
    sharded = [x for x in engine.target.state if not x.sharding.is_fully_replicated]
    assert sharded and all(x.sharding.device_set == set(devices[2:4]) for x in sharded)
    assert all(x.sharding.device_set == set(devices[:2]) for x in engine.draft.state)
    assert _solve(engine, problems) == _solve(together, problems)
