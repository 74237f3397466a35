"""Stage `sapo` end to end on a tiny random pair: a run stopped after its first checkpoint and
started again ends with the parameters of an uninterrupted run, the target never changes, the
metrics name every reward term and hacking counter, and a bad config fails before any work.

The tiny models write random tokens, so steps are cut at the letter `e` (as in test_rl_rollout)
rather than at a blank line they would rarely write."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file
from tiny_pair import make_tiny_pair, tiny_sapo_config

from dreamr_jax.config import ConfigError
from dreamr_jax.models.hf_io import save_pretrained
from dreamr_jax.serve.checkpoints import load_checkpoint, weights_digest
from dreamr_jax.train.sapo import SapoTrainer, run_sapo, sapo_trainer

STEPS = 4


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_tiny_pair(str(tmp_path_factory.mktemp("pair")))


def _config(pair, output_dir: str, *overrides: str):
    target, draft = pair
    return tiny_sapo_config(target, draft, output_dir, f"train.steps={STEPS}", *overrides)


def _weights(folder: str) -> dict[str, np.ndarray]:
    return load_file(os.path.join(folder, "model.safetensors"))


@pytest.fixture(scope="module")
def whole(pair, tmp_path_factory):
    """An uninterrupted run through the trainer, its trained draft saved, with the target's and
    the reference's arrays as they were before it."""
    workdir = tmp_path_factory.mktemp("whole")
    cfg = _config(pair, str(workdir))
    digest = weights_digest(pair[0])
    trainer = sapo_trainer(cfg)  # as run_sapo builds it: on the mesh
    before = jax.device_get((trainer.target_state, trainer.reference))
    result = trainer.run()
    save_pretrained(result.model, str(workdir / "trained"))
    return dict(
        cfg=cfg, trainer=trainer, result=result, before=before, digest=digest, workdir=workdir
    )


def test_a_stopped_run_resumes_to_the_uninterrupted_parameters(pair, whole, tmp_path):
    parted_cfg = _config(pair, str(tmp_path / "parted"))
    first = run_sapo(parted_cfg, stop_after=3)  # checkpoint at step 2; step 3 is lost
    assert first["step"] == 3 and "export_dir" not in first
    resumed = run_sapo(parted_cfg)
    assert resumed["step"] == STEPS and resumed["skipped"] == 0.0
    assert 0.0 <= resumed["eval/accuracy"] <= 1.0  # the trained draft evaluated on val

    want, got = _weights(str(whole["workdir"] / "trained")), _weights(resumed["export_dir"])
    start = _weights(pair[1])
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert any(not np.array_equal(want[n], start[n]) for n in want)  # it did train


def test_metrics_name_every_reward_term_and_hacking_counter(whole):
    lines = [json.loads(line) for line in open(whole["workdir"] / "metrics" / "metrics.jsonl")]
    train = [line for line in lines if "train/reward" in line]
    assert [line["step"] for line in train] == list(range(1, STEPS + 1))
    for key in (
        "reward_outcome",
        "reward_draft",
        "reward_length",
        "acceptance",
        "accepted_wrong",
        "wrong_steps",
        "steps_per_rollout",
        "cut_steps",
        "short_chains",
        "flat_groups",
        "kl",
        "clip_fraction",
        "entropy",
        "rollout_tokens",
        "learning_rate",
        "rollout_s",
        "score_s",
        "update_s",
    ):
        assert np.isfinite(train[-1][f"train/{key}"]), key
    assert all(line["train/skipped"] == 0.0 for line in train)


def test_the_target_never_changes(pair, whole):
    target_before, reference_before = whole["before"]
    trainer = whole["trainer"]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(trainer.target_state), target_before)
    # The frozen KL reference is the draft as it started, not the trained policy.
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(trainer.reference), reference_before)
    assert weights_digest(pair[0]) == whole["digest"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("sapo.rewards.brevity=1", "unknown reward 'brevity'"),
        ("sapo.advantage=ppo", "unknown advantage 'ppo'"),
    ],
)
def test_an_unknown_part_fails_at_start_with_the_known_names(pair, tmp_path, override, message):
    cfg = _config(pair, str(tmp_path / "run"), override)
    draft = load_checkpoint(cfg.train.init_from, cfg.prompt)
    with pytest.raises(ValueError, match=message):
        SapoTrainer(cfg, draft, draft)
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_config_errors_name_the_key(pair, tmp_path):
    with pytest.raises(ConfigError, match="train.init_from"):
        _config(pair, str(tmp_path), "train.init_from=")
    with pytest.raises(ConfigError, match="sapo.micro_batches"):
        _config(pair, str(tmp_path), "sapo.micro_batches=3")  # 4 rows
