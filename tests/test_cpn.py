"""The CPN/TBVM scorer against a NumPy reference, with its edge cases."""

from __future__ import annotations

import numpy as np
import pytest

from dreamr_jax.speculative.cpn import cpn_verdicts

POS, NEG = (3, 7), (5,)


def reference(logits: np.ndarray, alpha: float, floor: float):
    z = logits.astype(np.float64)
    probs = np.exp(z - z.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    s_pos, s_neg = probs[:, list(POS)].sum(-1), probs[:, list(NEG)].sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(s_pos + s_neg > 0, s_pos / (s_pos + s_neg), 0.5)
    return s_pos, s_neg, p, (p > alpha) & (s_pos + s_neg >= floor)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.7, 0.9])
def test_matches_numpy_on_random_logits(alpha):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (256, 11)).astype(np.float32)
    logits[:64, list(POS)] += 4  # some confident yes, some confident no
    logits[64:128, list(NEG)] += 4
    got = cpn_verdicts(logits, POS, NEG, alpha, 0.05)
    s_pos, s_neg, p, accept = reference(logits, alpha, 0.05)
    np.testing.assert_allclose(np.asarray(got.s_pos), s_pos, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(got.s_neg), s_neg, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(got.p), p, rtol=1e-5, atol=1e-6)
    # Decisions agree wherever p is not within float error of alpha.
    clear = np.abs(p - alpha) > 1e-5
    np.testing.assert_array_equal(np.asarray(got.accept)[clear], accept[clear])
    assert 0 < accept.sum() < len(accept) or alpha == 0.0


def test_edge_cases():
    big = 1e4
    logits = np.zeros((6, 11), np.float32)
    logits[0, 3] = big  # certain yes
    logits[1, 5] = big  # certain no
    logits[2, 0] = big  # the judge answered something else: both masses ~0
    logits[3, [3, 5]] = np.log([0.7, 0.3]) + 50  # p exactly 0.7: not > alpha
    logits[4, :] = -np.inf
    logits[4, [3, 5]] = 0.0  # -inf elsewhere: only yes/no possible, p = 0.5
    logits[5, [3, 7, 5]] = [20.0, 20.0, 20.0 + np.log(2.0)]  # yes split over two ids: p = 0.5
    v = cpn_verdicts(logits, POS, NEG, 0.7, 0.05)
    p, accept, ok = np.asarray(v.p), np.asarray(v.accept), np.asarray(v.format_ok)
    assert p[0] == pytest.approx(1.0) and accept[0]
    assert p[1] == pytest.approx(0.0) and not accept[1]
    assert not ok[2] and not accept[2] and np.isfinite(p[2])
    assert p[3] == pytest.approx(0.7, abs=1e-6) and ok[3]
    assert p[4] == pytest.approx(0.5) and ok[4] and not accept[4]
    assert p[5] == pytest.approx(0.5, abs=1e-6)
    assert np.all(np.isfinite(np.asarray(v.s_pos))) and np.all(np.isfinite(np.asarray(v.s_neg)))
    # alpha >= 1 never accepts, whatever the logits; alpha 0 accepts everything in format.
    assert not np.asarray(cpn_verdicts(logits, POS, NEG, 1.0, 0.0).accept).any()
    everything = np.asarray(cpn_verdicts(logits, POS, NEG, -1.0, 0.0).accept)
    assert everything.all()
