"""SAPO's jitted policy update on a tiny random draft (one decoder layer of the DigitMath config):
the SGD step is -lr times the big-batch gradient and lowers the loss, micro-batches add up to the
one-batch step (token mean over the whole batch), a non-finite step changes nothing, the frozen
reference is left alone, the step compiles once per shape, and sharded params keep their layout.

Completions are random tokens of uneven lengths rather than sampled rollouts: the update does not
care where they came from, and the uneven lengths make a mean of micro-batch means differ from the
token mean. The old and reference log-probs are the policy's plus noise, so ratios spread around
1, some tokens clip and the KL term has a gradient.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dreamr_jax.config import load_config
from dreamr_jax.config.schema import PromptConfig, TrainConfig
from dreamr_jax.data import digitmath
from dreamr_jax.data.digitmath import problem_image
from dreamr_jax.data.prompts import PromptBuilder
from dreamr_jax.data.tokenizer import build_default_tokenizer
from dreamr_jax.models import init_model
from dreamr_jax.models.processor import make_image_processor
from dreamr_jax.parallel import make_mesh, state_shardings
from dreamr_jax.rl.losses import grpo_loss
from dreamr_jax.rl.rollout import Prompt, prompt_rows, token_logprobs
from dreamr_jax.rl.update import (
    UpdateConfig,
    init_optimizer_state,
    place_batch,
    sapo_update,
    update_batch,
)

PROMPTS, GROUP = 2, 2  # 4 rows
LENGTHS = (12, 5, 8, 1)  # micro-batches of 2 rows hold 17 and 9 tokens
T = max(LENGTHS)
ADVANTAGES = (1.0, -1.0, 0.5, -0.7)
CONFIG = UpdateConfig(epsilon=0.2, beta=0.1)  # a large beta, so the KL term is exercised
LR = 0.05
# One object (a static argument, hashed by identity). Its momentum trace is optimizer state that
# a skipped step must leave alone; on the first step it equals the gradient, so that step is
# plain SGD.
SGD = optax.sgd(LR, momentum=0.9)
ADAMW = TrainConfig(steps=10, warmup_steps=0, learning_rate=1e-3)


@pytest.fixture(scope="module")
def setup():
    cfg = load_config("configs/digitmath/base.yaml").model
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_hidden_layers=1))
    model = init_model(cfg, seed=2)
    graphdef, params = nnx.split(model)
    builder = PromptBuilder.create(build_default_tokenizer(), cfg, PromptConfig())
    processor = make_image_processor(cfg.vision)
    prompts = [
        Prompt.of(builder, processor, p.question, [problem_image(p)])
        for p in digitmath.generate_problems("test", PROMPTS, 0)
    ]
    rows = prompt_rows(cfg, prompts, GROUP)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.text.vocab_size, (len(LENGTHS), T)).astype(np.int32)
    mask = np.arange(T)[None, :] < np.asarray(LENGTHS)[:, None]
    policy = np.asarray(token_logprobs(graphdef, params, rows, tokens, mask, CONFIG.sampling))

    def near_policy(scale):
        noise = rng.normal(0.0, scale, policy.shape).astype(np.float32)
        return np.where(mask, policy + noise, 0.0).astype(np.float32)

    return dict(
        cfg=cfg,
        graphdef=graphdef,
        params=jax.device_get(params),  # host copy: every step gets fresh device buffers
        rows=rows,
        tokens=tokens,
        mask=mask,
        policy=policy,  # the log-probs under `params`, the policy before any step
        old=near_policy(0.3),
        # As if the SFT draft had drifted from the policy: a KL term with a gradient.
        reference=near_policy(0.2),
    )


def _fresh(tree):
    """Device copies that the step may donate (never aliases of host or shared arrays)."""
    return jax.tree.map(lambda x: jnp.copy(jnp.asarray(x)), tree)


def _batch(s, micro_batches=1, advantages=ADVANTAGES):
    return update_batch(
        s["cfg"],
        s["rows"],
        s["tokens"],
        s["mask"],
        s["old"],
        s["reference"],
        np.asarray(advantages, np.float32),
        micro_batches,
    )


def _loss(s, params):
    """The big-batch loss, computed directly (no micro-batches, no step)."""
    policy = token_logprobs(
        s["graphdef"], params, s["rows"], s["tokens"], s["mask"], CONFIG.sampling
    )
    loss, _ = grpo_loss(
        policy,
        s["old"],
        s["reference"],
        jnp.asarray(ADVANTAGES, jnp.float32),
        jnp.asarray(s["mask"]),
        epsilon=CONFIG.epsilon,
        beta=CONFIG.beta,
    )
    return loss


@pytest.fixture(scope="module")
def sgd_step(setup):
    """One SGD step on the whole batch: (new params, metrics) on the host."""
    params = _fresh(setup["params"])
    new, _, metrics = sapo_update(
        setup["graphdef"], SGD, CONFIG, params, init_optimizer_state(SGD, params), _batch(setup)
    )
    return jax.device_get(new), jax.device_get(metrics)


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_the_first_step_is_minus_lr_times_the_gradient_and_lowers_the_loss(setup, sgd_step):
    new, metrics = sgd_step
    loss = float(_loss(setup, _fresh(setup["params"])))
    assert metrics["skipped"] == 0.0
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
    assert metrics["tokens"] == sum(LENGTHS)
    assert 0.0 < metrics["clip_fraction"] < 1.0 and metrics["kl"] > 0.0
    # new = params - lr * grad: the step's length is lr times the reported gradient norm (the
    # micro-batch test below pins the gradient itself to the one-batch one).
    step = jax.tree.map(lambda n, p: n - p, new, setup["params"])
    np.testing.assert_allclose(optax.tree.norm(step), LR * metrics["grad_norm"], rtol=1e-4)
    assert float(_loss(setup, _fresh(new))) < loss


def test_micro_batches_add_up_to_the_one_batch_step_on_a_sharded_draft(setup, sgd_step):
    """Two micro-batches, on 2 of the fake devices with the params FSDP-sharded by the rule table
    (one compilation for both checks): the same step as one unsharded batch, and the new params
    and momentum keep the rule table's layout."""
    mesh = make_mesh(1, 2, 1, devices=jax.devices()[:2])
    shardings = state_shardings(nnx.state(nnx.merge(setup["graphdef"], setup["params"])), mesh)
    params = jax.device_put(_fresh(setup["params"]), shardings)
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(params))
    batch = place_batch(_batch(setup, micro_batches=2), mesh)
    assert batch.tokens.shape == (2, 2, T)
    new, opt_state, metrics = sapo_update(
        setup["graphdef"], SGD, CONFIG, params, init_optimizer_state(SGD, params), batch, mesh=mesh
    )
    one_new, one_metrics = sgd_step
    _assert_trees_close(jax.device_get(new), one_new)
    for name, value in one_metrics.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-5, atol=1e-7, err_msg=name)
    momentum = opt_state[0].trace
    for tree in (new, momentum):
        for x, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True):
            assert x.sharding.is_equivalent_to(sharding, x.ndim)
    # The uneven micro-batches (17 and 9 tokens) make a mean of their means a different number,
    # so the equality above does test the token weighting.
    halves = [slice(0, 2), slice(2, 4)]
    means = [_micro_loss(setup, h) for h in halves]
    assert abs(np.mean(means) - one_metrics["loss"]) > 1e-3


def test_remat_takes_the_same_step(setup, sgd_step):
    """The backward pass that recomputes each decoder layer from its input gives the step that
    keeps every activation."""
    params = _fresh(setup["params"])
    new, _, metrics = sapo_update(
        setup["graphdef"],
        SGD,
        dataclasses.replace(CONFIG, remat=True),
        params,
        init_optimizer_state(SGD, params),
        _batch(setup),
    )
    one_new, one_metrics = sgd_step
    _assert_trees_close(jax.device_get(new), one_new)
    np.testing.assert_allclose(metrics["grad_norm"], one_metrics["grad_norm"], rtol=1e-5)
    # and it is a rematerialised pass: one checkpointed region a decoder layer
    s = setup
    jaxpr = jax.make_jaxpr(
        lambda p: token_logprobs(
            s["graphdef"], p, s["rows"], s["tokens"], s["mask"], CONFIG.sampling, True
        )
    )(s["params"])
    layers = nnx.merge(s["graphdef"], s["params"]).config.text.num_hidden_layers
    assert str(jaxpr).count("remat") == layers


def _micro_loss(s, rows: slice) -> float:
    mask = s["mask"][rows]
    loss, _ = grpo_loss(
        jnp.asarray(s["policy"][rows]),
        s["old"][rows],
        s["reference"][rows],
        jnp.asarray(ADVANTAGES[rows], jnp.float32),
        jnp.asarray(mask),
        epsilon=CONFIG.epsilon,
        beta=CONFIG.beta,
    )
    return float(loss)


def test_a_non_finite_step_is_skipped_and_the_step_compiles_once(setup, sgd_step):
    graphdef = setup["graphdef"]
    reference = _fresh(setup["params"])  # the frozen SFT draft: its own buffers
    params = _fresh(setup["params"])
    opt_state = init_optimizer_state(SGD, params)
    compiled = sapo_update._cache_size()  # sgd_step compiled these shapes already

    params, opt_state, metrics = sapo_update(
        graphdef, SGD, CONFIG, params, opt_state, _batch(setup)
    )
    assert metrics["skipped"] == 0.0
    before = jax.device_get((params, opt_state))
    assert any(np.any(x != 0) for x in jax.tree.leaves(before[1]))  # the momentum moved

    poisoned = _batch(setup, advantages=(1.0, np.nan, 0.5, -0.7))
    params, opt_state, metrics = sapo_update(graphdef, SGD, CONFIG, params, opt_state, poisoned)
    assert metrics["skipped"] == 1.0 and not np.isfinite(metrics["loss"])
    after = jax.device_get((params, opt_state))
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(x, y)  # bit-equal

    params, opt_state, metrics = sapo_update(
        graphdef, SGD, CONFIG, params, opt_state, _batch(setup)
    )
    assert metrics["skipped"] == 0.0
    assert sapo_update._cache_size() == compiled  # no new compilation

    # The reference was never passed to the step: alive and unchanged.
    for x, y in zip(jax.tree.leaves(reference), jax.tree.leaves(setup["params"]), strict=True):
        assert not x.is_deleted()
        np.testing.assert_array_equal(np.asarray(x), y)


def test_the_sft_optimizer_config_builds_the_state(setup):
    """A `TrainConfig` stands for the SFT stage's AdamW (`train.optim.make_optimizer`)."""
    state = init_optimizer_state(ADAMW, setup["params"])
    mu = state[1][0].mu  # clip_by_global_norm, then adamw's (scale_by_adam, ...)
    assert jax.tree.structure(mu) == jax.tree.structure(setup["params"])
