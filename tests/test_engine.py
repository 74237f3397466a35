"""The speculative engine on a tiny random pair (peaked logits, see tiny_pair.py): the invariants
of DESIGN.md section 2 (sd greedy, exact, and dreamr with alpha >= 1 reproduce target greedy token
for token), dreamr's device loop against its host loop, what a judge's verdicts commit, step
generation and cache rollback, tree verification, and well-formed chains in every mode."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from tiny_pair import MIXED, VOCAB, load_near_target, make_tiny_pair, with_judge

from dreamr_jax.config.schema import MODES, PromptConfig, SpecConfig
from dreamr_jax.data import digitmath
from dreamr_jax.data.digitmath import problem_image
from dreamr_jax.serve.checkpoints import load_checkpoint
from dreamr_jax.speculative import modes
from dreamr_jax.speculative.engine import Engine
from dreamr_jax.speculative.modes.sd import sd_accept
from dreamr_jax.speculative.runner import select_rows, take_branch, truncate

N_PROBLEMS = 12
SPEC = SpecConfig(max_new_tokens=40, max_step_tokens=8)


def test_every_mode_the_config_accepts_is_registered():
    assert modes.names() == tuple(sorted(MODES))
    with pytest.raises(ValueError, match="unknown mode 'fpsr'.*dreamr"):
        modes.get("fpsr")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    target, draft = make_tiny_pair(str(tmp_path_factory.mktemp("pair")))
    return load_checkpoint(target, PromptConfig()), load_checkpoint(draft, PromptConfig())


@pytest.fixture(scope="module")
def problems():
    return digitmath.generate_problems("test", N_PROBLEMS, 0)


def _solve_all(pair, problems, **spec):
    engine = Engine(*pair, dataclasses.replace(SPEC, **spec))
    return engine, [engine.solve(p.question, [problem_image(p)]) for p in problems]


@pytest.fixture(scope="module")
def target_outputs(pair, problems):
    return [s.tokens for s in _solve_all(pair, problems, mode="target")[1]]


@pytest.mark.parametrize(
    "spec",
    [
        {"mode": "sd"},
        {"mode": "exact"},
        {"mode": "dreamr", "alpha": 1.0, "fallback": "lazy"},
        {"mode": "dreamr", "alpha": 1.0, "fallback": "eager"},
        {"mode": "dreamr", "alpha": 1.0, "fallback": "resume"},
    ],
    ids=["sd", "exact", "dreamr-alpha1-lazy", "dreamr-alpha1-eager", "dreamr-alpha1-resume"],
)
def test_greedy_invariants_reproduce_target(pair, problems, target_outputs, spec):
    _, solutions = _solve_all(pair, problems, **spec)
    assert [s.tokens for s in solutions] == target_outputs
    if spec["mode"] in ("exact", "dreamr"):
        assert all(s.accepted == 0 and s.proposed > 0 for s in solutions)


@pytest.fixture(scope="module")
def near_target(pair):
    return load_near_target(pair[0].path)


@pytest.mark.parametrize(
    "draft, mode",
    [("draft", "exact"), ("target", "exact"), ("near-target", "exact"), ("near-target", "dreamr")],
)
def test_device_loop_ends_the_chain_where_the_target_does(pair, problems, near_target, draft, mode):
    """exact, and dreamr at alpha 1 (its judge asked, never followed), run as one device loop
    (`window_loop.speculate`). After a parting the draft finishes a step the target began: its
    step must count the target's tokens, or the chain is cut elsewhere than the target alone
    cuts it and ends elsewhere. Budgets 37 and 21 fall inside a step (the tiny target writes
    8-token steps); with the target as its own draft whole windows are committed."""
    draft = {"draft": pair[1], "target": pair[0], "near-target": near_target}[draft]
    target = pair[0]
    for budget in (37, 21):
        spec = dataclasses.replace(SPEC, max_new_tokens=budget)
        alone = Engine(target, None, dataclasses.replace(spec, mode="target"))
        loop = Engine(target, draft, dataclasses.replace(spec, mode=mode, alpha=1.0))
        assert loop.device_loop
        want = [alone.solve(p.question, [problem_image(p)]).tokens for p in problems[:6]]
        got = [loop.solve(p.question, [problem_image(p)]).tokens for p in problems[:6]]
        assert got == want
        assert any(len(w) > budget for w in want)  # some chains end past the budget


def test_sd_device_loop_is_the_host_loops_sd(pair, problems, near_target):
    """Greedy sd as one device loop (`sd_loop.py`) against its host loop (`modes/sd.py`): the
    target's chain token for token, also where the budget falls inside a step (a round that
    goes past the chain's end keeps only what comes before it), and the same counters, with a
    draft that agrees with the target on some tokens and not on others."""
    for budget in (40, 21):
        spec = dataclasses.replace(SPEC, max_new_tokens=budget, mode="sd")
        alone = Engine(pair[0], None, dataclasses.replace(spec, mode="target"))
        device = Engine(pair[0], near_target, spec)
        host = Engine(pair[0], near_target, spec, host_loop=True)
        assert device.device_loop and not host.device_loop
        accepted = proposed = 0
        for p in problems[:4]:
            want = alone.solve(p.question, [problem_image(p)]).tokens
            got = device.solve(p.question, [problem_image(p)])
            ref = host.solve(p.question, [problem_image(p)])
            assert got.tokens == ref.tokens == want
            counters = (ref.proposed, ref.accepted, ref.target_calls)
            assert (got.proposed, got.accepted, got.target_calls) == counters
            assert _records(got) == _records(ref)
            accepted, proposed = accepted + got.accepted, proposed + got.proposed
        assert 0 < accepted < proposed  # the draft's tokens were kept and refused


@pytest.mark.parametrize(
    "mode", ["dreamr", "dreamr-resume", "exact", "specreason", "lookahead", "draft"]
)
def test_modes_write_well_formed_chains(pair, problems, mode):
    mode, _, fallback = mode.partition("-")
    engine, solutions = _solve_all(pair, problems[:4], mode=mode, fallback=fallback or "lazy")
    for sol in solutions:
        committed = [t for s in sol.steps if s.committed for t in s.tokens]
        assert committed == sol.tokens
        assert sol.tokens[-1] in engine.eos or len(sol.tokens) >= SPEC.max_new_tokens
        assert all(len(s.tokens) <= SPEC.max_step_tokens for s in sol.steps)
        assert sol.accepted <= sol.proposed
        assert all(s.author in ("draft", "target") for s in sol.steps)
        if mode != "draft":
            assert sol.proposed > 0 and sol.target_calls > 0


def _records(sol):
    return [(s.text, s.author, s.committed, s.accepted, s.p is None) for s in sol.steps]


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.7, 0.9])
def test_device_loop_commits_what_the_host_loop_commits(pair, problems, near_target, alpha):
    """dreamr, greedy, `resume`: the device loop (`window_loop.speculate`) takes the decisions
    of the host loop (`modes/dreamr.py`): the same tokens, counters and step records (the
    rejected draft steps included), with a judge that accepts some steps, rejects others and
    misses the format on some, and a draft that writes the target's own steps, parts from them
    partway (resume) or writes its own."""
    seen = {"accepted": 0, "refused": 0, "format_misses": 0, "resumed": 0}
    # The random draft doubts most of its steps: at confidence 0 its windows hold W steps, so
    # steps after a rejected one are drafted (and judged) too.
    for draft, confidence in ((pair[1], 0.0), (near_target, SPEC.draft_confidence)):
        spec = dataclasses.replace(SPEC, mode="dreamr", alpha=alpha, draft_confidence=confidence)
        device = with_judge(Engine(pair[0], draft, spec), MIXED)
        host = with_judge(Engine(pair[0], draft, spec, host_loop=True), MIXED)
        assert device.device_loop and not host.device_loop
        for p in problems[:6]:
            got = device.solve(p.question, [problem_image(p)])
            want = host.solve(p.question, [problem_image(p)])
            assert got.tokens == want.tokens
            counters = (want.proposed, want.accepted, want.format_misses)
            assert (got.proposed, got.accepted, got.format_misses) == counters
            assert _records(got) == _records(want)
            np.testing.assert_allclose(
                [s.p for s in got.steps if s.p is not None],
                [s.p for s in want.steps if s.p is not None],
                atol=1e-4,
            )
            seen["accepted"] += want.accepted
            seen["refused"] += sum(s.author == "draft" and not s.committed for s in want.steps)
            seen["format_misses"] += want.format_misses
            ends = set(device.target.stop_ids) | device.eos
            seen["resumed"] += sum(
                s.author == "target" and s.tokens[-1] not in ends for s in want.steps
            )
    # Every kind of decision was taken (at alpha 0 only a format miss rejects).
    assert all(seen.values()), seen


@pytest.mark.parametrize("loop", ["device", "host"])
def test_steps_the_judge_accepts_are_committed_as_the_draft_wrote_them(pair, problems, loop):
    """A judge that says yes to every step (all its mass on the "yes" words): dreamr commits
    the draft's steps as they are, so its chain is the draft's own."""
    everything = (tuple(range(1, VOCAB)), (0,))
    spec = dataclasses.replace(SPEC, mode="dreamr")
    engine = with_judge(Engine(*pair, spec, host_loop=loop == "host"), everything)
    alone = Engine(*pair, dataclasses.replace(SPEC, mode="draft"))
    for p in problems[:4]:
        sol = engine.solve(p.question, [problem_image(p)])
        assert sol.tokens == alone.solve(p.question, [problem_image(p)]).tokens
        assert sol.accepted == sol.proposed > 0
        alpha = engine.spec.alpha  # the default, resolved by the engine
        assert all(s.author == "draft" and s.accepted and s.p > alpha for s in sol.steps)


def test_lazy_and_eager_fallbacks_commit_the_same_chain(pair, problems):
    """With a judge that accepts some steps and rejects others (alpha < 1), `eager` computes the
    target's step at every position of a window before the verdicts and `lazy` only after a
    rejection; greedy, both commit the same chain, step records and counters."""
    spec = dataclasses.replace(SPEC, mode="dreamr", alpha=0.5, draft_confidence=0.0)
    lazy, eager = (
        with_judge(Engine(*pair, dataclasses.replace(spec, fallback=f)), MIXED)
        for f in ("lazy", "eager")
    )
    accepted = refused = 0
    for p in problems[:6]:
        want = lazy.solve(p.question, [problem_image(p)])
        got = eager.solve(p.question, [problem_image(p)])
        assert got.tokens == want.tokens
        assert _records(got) == _records(want)
        assert (got.proposed, got.accepted) == (want.proposed, want.accepted)
        accepted += want.accepted
        refused += sum(s.author == "draft" and not s.committed for s in want.steps)
    assert accepted > 0 and refused > 0  # both verdicts were taken


@pytest.mark.parametrize("fallback", ["lazy", "eager", "resume", "resume-host"])
def test_a_rejected_step_is_replaced_by_the_target_s(pair, problems, target_outputs, fallback):
    """A judge that says no to every step (in format: its mass on the "no" words), at the
    default alpha: every window's first step that is not the target's own is rejected, and
    the fallback commits the target's tokens in its place (its whole step, or with `resume`
    up to its first token that differs from the rejected step's), so the chain is the
    target's."""
    fallback, _, host = fallback.partition("-")
    spec = dataclasses.replace(SPEC, mode="dreamr", fallback=fallback)
    nothing = ((0,), tuple(range(1, VOCAB)))
    engine = with_judge(Engine(*pair, spec, host_loop=bool(host)), nothing)
    for p, want in zip(problems[:4], target_outputs, strict=False):
        sol = engine.solve(p.question, [problem_image(p)])
        assert sol.tokens == want
        assert sol.accepted == sol.format_misses == 0 < sol.proposed
        rejected = [i for i, s in enumerate(sol.steps) if not s.committed]
        assert rejected and all(sol.steps[i].p < engine.spec.alpha for i in rejected)
        for i in rejected:  # the target's tokens in its place: up to where they part, or all
            step, fallback_step = sol.steps[i].tokens, sol.steps[i + 1].tokens
            assert sol.steps[i + 1].author == "target"
            same = np.asarray(step[: len(fallback_step)]) == fallback_step[: len(step)]
            parted = int(np.argmin(same)) if not same.all() else len(same)
            assert step == fallback_step or parted < min(len(step), len(fallback_step))
            if fallback == "resume":
                assert len(fallback_step) in (parted + 1, len(step))


def test_sd_sampling_emits_tokens_distributed_as_the_target():
    """Leviathan acceptance: whatever the draft proposes (drawn from q), the emitted token is
    distributed as the target's p, including tokens the draft never proposes."""
    p = np.array([0.5, 0.2, 0.15, 0.1, 0.05, 0.0])
    q = np.array([0.1, 0.4, 0.0, 0.3, 0.1, 0.1])
    probs = np.stack([p, np.full(6, 1 / 6)])  # before the proposed token, and after it
    log_q = np.log(np.maximum(q, 1e-30))[None, None]
    rng = np.random.default_rng(0)
    trials, counts = 40_000, np.zeros(6)
    for _ in range(trials):
        proposal = [int(rng.choice(6, p=q))]
        kept, extra = sd_accept(proposal, None, probs, log_q, rng)
        counts[proposal[0] if kept else extra] += 1
    np.testing.assert_allclose(counts / trials, p, atol=0.01)


def test_sampled_sd_is_seeded_and_well_formed(pair, problems):
    spec = dataclasses.replace(SPEC, mode="sd", temperature=1.0)
    runs = []
    for seed in (0, 0, 1):
        engine = Engine(*pair, spec, seed=seed)
        runs.append([engine.solve(p.question, [problem_image(p)]) for p in problems[:3]])
    assert [s.tokens for s in runs[0]] == [s.tokens for s in runs[1]]
    assert [s.tokens for s in runs[0]] != [s.tokens for s in runs[2]]
    for sol in runs[0]:
        assert 0 < len(sol.tokens) <= SPEC.max_new_tokens and sol.accepted <= sol.proposed


def test_rollback_then_regenerate_gives_the_same_step(pair, problems):
    engine = Engine(*pair, dataclasses.replace(SPEC, mode="target"))
    runner, p = engine.target, problems[0]
    ids, inputs = engine.prompt(p.question, [problem_image(p)])
    session = runner.start(inputs, engine.max_len(len(ids)))
    key = jax.random.key(0)
    first, n1, _, session = runner.step(session, key, 8)
    assert 0 < len(engine.take(first, n1)) <= 8
    logits_after_1 = session.logits
    second, n2, _, session = runner.step(session, key, 8)
    step2 = engine.take(second, n2)
    # Back to the end of step 1, and step 2 again: same tokens.
    session = truncate(session, len(step2), logits_after_1)
    again, n3, _, session = runner.step(session, key, 8)
    assert engine.take(again, n3) == step2
    # Chunked extend of a step gives the logits of token-by-token decoding.
    base = truncate(session, len(step2), logits_after_1)
    chunk, _ = runner.extend(select_rows(base, [0]), [step2], [list(range(len(step2)))])
    stepwise = []
    for token in step2:
        _, base = runner.extend(base, [[token]], [[0]])
        stepwise.append(np.asarray(base.logits[0]))
    np.testing.assert_allclose(np.asarray(chunk[0]), np.stack(stepwise), atol=2e-4)


@pytest.mark.parametrize("fallback", ["lazy", "resume"], ids=["host-loop", "device-loop"])
def test_rejected_steps_the_target_agrees_with_cost_no_decoding(
    pair, problems, target_outputs, fallback
):
    """The target as its own draft, with alpha 1: the judge rejects every step, yet each is the
    target's own greedy step, which the verification pass has already computed token by token:
    it is committed from there with no decoding, and the window goes on (one target call, the
    verification pass, per window of W steps)."""
    spec = dataclasses.replace(
        SPEC, mode="dreamr", alpha=1.0, draft_confidence=0.0, fallback=fallback
    )
    engine = Engine(pair[0], pair[0], spec)
    solutions = [engine.solve(p.question, [problem_image(p)]) for p in problems]
    assert [s.tokens for s in solutions] == target_outputs
    for sol in solutions:
        committed = [s for s in sol.steps if s.committed]
        assert sol.accepted == 0 and all(s.author == "target" for s in committed)
        assert sol.target_calls == -(-len(committed) // SPEC.window)


@pytest.mark.parametrize("budget", [40, 9], ids=["window-full", "budget-cut"])
def test_window_in_one_call_equals_step_by_step(pair, problems, budget):
    engine = Engine(*pair, dataclasses.replace(SPEC, mode="target"))
    runner, p = engine.draft, problems[1]
    ids, inputs = engine.prompt(p.question, [problem_image(p)])
    key = jax.random.key(0)
    one_by_one, logits = [], []
    session = runner.start(inputs, engine.max_len(len(ids)))
    logits.append(np.asarray(session.logits))
    while len(one_by_one) < 3 and sum(map(len, one_by_one)) < budget:
        tokens, n, _, session = runner.step(session, key, SPEC.max_step_tokens)
        one_by_one.append(engine.take(tokens, n))
        logits.append(np.asarray(session.logits))
    reference = session
    steps, marks, session = runner.steps(
        runner.start(inputs, engine.max_len(len(ids))), key, budget, 3, SPEC.max_step_tokens
    )
    assert steps == one_by_one and (budget == 40) == (len(steps) == 3)
    np.testing.assert_allclose(
        np.asarray(marks[0, : len(steps) + 1]), np.concatenate(logits), atol=1e-5
    )
    np.testing.assert_allclose(np.asarray(session.logits), np.asarray(reference.logits), atol=1e-5)
    assert int(session.cache.length[0]) == int(reference.cache.length[0])
    # The cache holds the same tokens: the next step is the same.
    after, n, _, _ = runner.step(session, key, SPEC.max_step_tokens)
    want, m, _, _ = runner.step(reference, key, SPEC.max_step_tokens)
    assert engine.take(after, n) == engine.take(want, m)


def test_window_ends_after_the_first_doubtful_step(pair, problems):
    """With `min_confidence` the window stops after the first step holding a token the draft drew
    at a probability below it, and keeps that step: it is the one the target must check."""
    engine = Engine(*pair, dataclasses.replace(SPEC, mode="target"))
    runner, p = engine.draft, problems[1]
    ids, inputs = engine.prompt(p.question, [problem_image(p)])
    max_len, key = engine.max_len(len(ids)), jax.random.key(0)
    full, _, _ = runner.steps(runner.start(inputs, max_len), key, 40, 3, SPEC.max_step_tokens)
    assert len(full) == 3
    # The probability the draft gave each token of its window, from one pass over the chain.
    start = runner.start(inputs, max_len)
    chain = [t for s in full for t in s]
    before = np.asarray(start.logits[0])[None]
    logits, _ = runner.extend(start, [chain], [list(range(len(chain) - 1))])
    probs = jax.nn.softmax(np.concatenate([before, np.asarray(logits[0])]), axis=-1)
    drawn = np.asarray(probs)[np.arange(len(chain)), chain]
    ends = np.cumsum([len(s) for s in full])
    least = [drawn[e - len(s) : e].min() for s, e in zip(full, ends, strict=True)]
    assert min(least[:-1]) < 0.99  # some threshold ends the window early: the test can fail
    for threshold in sorted({*least, 0.0}):
        # Just above a step's least likely token: that step is the last one written.
        confidence = min(1.0, float(threshold) * (1 + 1e-4))
        doubtful = [i for i, m in enumerate(least) if m < confidence]
        want = full[: doubtful[0] + 1] if doubtful else full
        steps, _, session = runner.steps(
            runner.start(inputs, max_len),
            key,
            40,
            3,
            SPEC.max_step_tokens,
            min_confidence=confidence,
        )
        assert steps == want, (confidence, least)
        assert int(session.cache.length[0]) == -(-len(ids) // 16) * 16 + sum(map(len, want))


def test_tree_verification_equals_separate_judge_queries(pair, problems):
    """verify_tree packs k candidates and k judge suffixes in one row with a tree mask; every
    verdict and every after-step distribution must match a plain query of that branch alone."""
    engine = Engine(*pair, dataclasses.replace(SPEC, mode="dreamr"))
    runner, p = engine.target, problems[1]
    ids, inputs = engine.prompt(p.question, [problem_image(p)])
    max_len = engine.max_len(len(ids))
    suffix = list(engine.builder.judge_suffix_ids)
    steps = [engine.builder.step_ids(s, final=False) for s in p.steps[:3]]
    after, verdict, greedy, _, _, _ = runner.verify_tree(
        runner.start(inputs, max_len), steps, suffix
    )
    # The greedy token before each chain token: the argmax after the prompt, then after each
    # token of the chain (what decoding the chain one token at a time would choose).
    chain = [t for s in steps for t in s]
    start = runner.start(inputs, max_len)
    before = int(np.argmax(np.asarray(start.logits[0])))
    logits, _ = runner.extend(start, [chain], [list(range(len(chain) - 1))])
    want = [before, *np.argmax(np.asarray(logits[0]), axis=-1).tolist()]
    assert np.asarray(greedy)[: len(chain)].tolist() == want
    for i in range(len(steps)):
        chain = [t for s in steps[: i + 1] for t in s]
        logits, _ = runner.extend(
            runner.start(inputs, max_len),
            [chain + suffix],
            [[len(chain) - 1, len(chain) + len(suffix) - 1]],
        )
        np.testing.assert_allclose(np.asarray(after[i]), np.asarray(logits[0, 0]), atol=2e-4)
        np.testing.assert_allclose(np.asarray(verdict[i]), np.asarray(logits[0, 1]), atol=2e-4)


@pytest.mark.parametrize("temperature", [0.0, 0.7], ids=["greedy", "sampled"])
def test_steps_side_by_side_equal_steps_on_copied_rows(pair, problems, temperature):
    """The eager fallback's and lookahead's target steps after every prefix of a window, decoded
    side by side in the verification's one cache row (`Verification.target_steps`), are the
    steps of rows that each hold a copy of the cache (`at`): the same tokens (same key, same
    draws), and the session taken for one branch continues as that row's does."""
    spec = dataclasses.replace(SPEC, mode="lookahead", temperature=temperature)
    engine = Engine(*pair, spec)
    p = problems[2]
    ids, inputs = engine.prompt(p.question, [problem_image(p)])
    max_len = engine.max_len(len(ids))
    steps = [engine.builder.step_ids(s, final=False) for s in p.steps[:3]]
    key, cap = jax.random.key(3), SPEC.max_step_tokens
    indices = [0, 1, 2, 3, 0]  # every prefix, and a padding copy (lookahead: W + 1 rows)

    def verification():
        return engine.verify(engine.target.start(inputs, max_len), steps)

    # The tiny target never writes the delimiter: a token it writes early after the first step
    # is made a stop token, so that steps of several lengths are taken.
    first, _, _, _ = engine.target.step(verification().at([1]), key, cap, engine.sampling)
    runner = dataclasses.replace(engine.target, stop_ids=(int(np.asarray(first)[0, 2]),))
    v = verification()
    want, want_n, _, rows = runner.step(v.at(indices), key, cap, engine.sampling)
    v = verification()
    got, got_n, branches, logits = v.target_steps(runner, indices, key, cap, engine.sampling)
    assert branches.cache.k.shape[1] == 1  # one row, no copies
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(got_n), np.asarray(want_n))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(rows.logits), atol=2e-4)
    lengths = [len(engine.take(got, got_n, i)) for i in range(4)]
    assert min(lengths) < cap == max(lengths), lengths
    # The shortest branch taken: its next step is the copied row's next step.
    row = int(np.argmin(lengths))
    taken = take_branch(branches, logits, row, lengths[row], cap)
    alone = select_rows(rows, [row])
    assert int(taken.cache.length[0]) == int(alone.cache.length[0])
    assert int(taken.cache.next_position[0]) == int(alone.cache.next_position[0])
    valid = np.asarray(alone.cache.valid[0])
    np.testing.assert_array_equal(np.asarray(taken.cache.valid[0]), valid)
    for got_kv, want_kv in ((taken.cache.k, alone.cache.k), (taken.cache.v, alone.cache.v)):
        got_kv, want_kv = np.asarray(got_kv)[:, 0], np.asarray(want_kv)[:, 0]
        np.testing.assert_allclose(got_kv[:, :, valid], want_kv[:, :, valid], atol=1e-5)
    after, m, _, _ = runner.step(taken, key, cap, engine.sampling)
    again, m2, _, _ = runner.step(alone, key, cap, engine.sampling)
    assert engine.take(after, m) == engine.take(again, m2)
