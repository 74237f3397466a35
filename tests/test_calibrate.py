"""The calibrated alpha: how it is picked from paired losses, and when serving may use it."""

from __future__ import annotations

import json
import shutil

import pytest

from dreamr_jax.calibrate import pick_alpha, upper_bound
from dreamr_jax.serve.checkpoints import CALIBRATION_FILE, calibrated_alpha, weights_digest


def _row(loss: float, sd: float) -> dict:
    return {"loss": loss, "loss_sd": sd}


def test_the_smallest_alpha_within_the_budget_at_the_confidence_is_picked():
    n = 500
    table = {
        "0.5": _row(0.030, 0.20),  # bound 0.030 + 1.2816 * 0.20 / sqrt(500) = 0.041
        "0.7": _row(0.004, 0.10),  # 0.004 + 0.0057 = 0.0097: within 1 point
        "0.9": _row(0.000, 0.06),
    }
    assert upper_bound(0.004, 0.10, n, 0.9) == pytest.approx(0.004 + 1.2816 * 0.10 / n**0.5, 1e-4)
    assert pick_alpha(table, [0.9, 0.5, 0.7], n, budget=0.01, confidence=0.9) == 0.7
    # More confidence asked, 0.7's bound (0.004 + 2.326 * 0.0045 = 0.0144) is over the budget.
    assert pick_alpha(table, [0.5, 0.7, 0.9], n, budget=0.01, confidence=0.99) == 0.9
    # Nothing within the budget: never accept, the target's own chain.
    assert pick_alpha(table, [0.5], n, budget=0.01, confidence=0.9) == 1.0


def test_alphas_are_tested_from_the_safest_down_and_the_first_failure_stops_the_search():
    n = 500
    table = {
        "0.5": _row(-0.010, 0.20),  # passes (bound 0.0015), but only below a failure
        "0.7": _row(0.020, 0.20),  # fails
        "0.8": _row(0.000, 0.10),
        "0.9": _row(0.000, 0.06),
    }
    assert pick_alpha(table, [0.5, 0.7, 0.8, 0.9], n, budget=0.01, confidence=0.9) == 0.8
    table["0.9"] = _row(0.020, 0.20)  # the safest fails: nothing below it is asked
    assert pick_alpha(table, [0.5, 0.7, 0.8, 0.9], n, budget=0.01, confidence=0.9) == 1.0


def test_serving_uses_a_calibration_only_with_the_target_it_was_made_with(tmp_path):
    target, other, draft = tmp_path / "target", tmp_path / "other", tmp_path / "draft"
    for folder, weights in ((target, b"target"), (other, b"other"), (draft, b"draft")):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(weights)
    assert calibrated_alpha(target, draft) is None  # never calibrated
    record = {"alpha": 0.35, "target_sha256": weights_digest(target)}
    (draft / CALIBRATION_FILE).write_text(json.dumps(record))
    assert calibrated_alpha(target, draft) == 0.35
    assert calibrated_alpha(other, draft) is None  # another target: the calibration is not its
    shutil.copy(other / "model.safetensors", target / "model.safetensors")
    assert calibrated_alpha(target, draft) is None  # the target retrained in place
