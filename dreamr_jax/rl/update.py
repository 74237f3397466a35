"""SAPO's policy update: one jitted optimizer step of the draft on a batch of scored rollouts.

The step runs on a split model (`graphdef` static, the parameter state traced and donated) under
plain `jax.jit`, like the SFT stage's `train_step`. Inside it, the rows are processed as M
micro-batches by a `lax.scan` that sums gradients, followed by one optimizer update, so a batch
too large for one forward/backward pass still takes exactly the big-batch step: each
micro-batch's token-mean loss is weighted by its share of the batch's unmasked tokens, which makes
the sum the token mean over the whole batch (a mean of micro-batch means would over-weight
micro-batches with short rollouts).

Rows are packed as the model reads them (`PromptRows`): the image patches of all rows lie in one
array, in row order, so micro-batches are cut on the host (`update_batch`), where each one gets
the patches of its own rows. Everything with a leading `[M, rows / M]` lives in `UpdateBatch`.

A step whose loss or any gradient is not finite changes nothing: the parameters and the
optimizer state come back bit-equal and the metrics say `skipped`.
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from dreamr_jax.config.schema import ModelConfig, TrainConfig
from dreamr_jax.models.inputs import ModelInputs, pad_vision
from dreamr_jax.models.sampling import Sampling
from dreamr_jax.parallel.rules import logical_to_spec, variable_sharding
from dreamr_jax.rl.registry import get
from dreamr_jax.rl.rollout import PromptRows, token_logprobs
from dreamr_jax.train.optim import make_optimizer

# An optimizer is either a training config (built with the SFT stage's `make_optimizer`, so equal
# configs share one compilation) or an optax transformation (hashed by identity: keep one object).
Optimizer = TrainConfig | optax.GradientTransformation


@dataclasses.dataclass(frozen=True)
class UpdateConfig:
    """The loss side of the step (static: one compilation per value).

    policy_loss: a name in the `policy_loss` registry; it gets `epsilon` and `beta` as keywords.
    sampling: the distribution the rollouts were drawn from; the policy's log-probs are taken in
        it (`token_logprobs`), as the old and reference ones must be.
    remat: the backward pass recomputes each decoder layer's activations from its input
        instead of keeping them (memory for compute; the gradient is the same).
    """

    policy_loss: str = "grpo"
    epsilon: float = 0.2
    beta: float = 1e-3
    sampling: Sampling = Sampling(temperature=1.0)
    remat: bool = False


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class UpdateBatch:
    """One update's rows cut into M micro-batches of r = rows / M rows (row order kept: micro-batch
    m holds rows m * r ... m * r + r - 1).

    inputs: `ModelInputs` with input_ids and attention_mask `[M, r, S]`, positions `[M, 3, r, S]`
        and vision arrays `[M, patches, ...]` (each micro-batch's own patches, padded alike).
    next_position: `[M, r]` int32. tokens: `[M, r, T]` int32. completion_mask: `[M, r, T]` bool.
    old_logprobs, reference_logprobs: `[M, r, T]` float32. advantages: `[M, r]` float32.
    """

    inputs: ModelInputs
    next_position: jax.Array
    tokens: jax.Array
    completion_mask: jax.Array
    old_logprobs: jax.Array
    reference_logprobs: jax.Array
    advantages: jax.Array

    @property
    def micro_batches(self) -> int:
        return self.tokens.shape[0]


def update_batch(
    config: ModelConfig,
    prompts: PromptRows,
    tokens: jax.Array,
    completion_mask: jax.Array,
    old_logprobs: jax.Array,
    reference_logprobs: jax.Array,
    advantages: jax.Array,
    micro_batches: int = 1,
) -> UpdateBatch:
    """Cuts one update's rows into `micro_batches` micro-batches (host-side for the prompts).

    prompts: `prompt_rows(config, ...)` for the policy's config, R rows. tokens,
    completion_mask: `Rollouts.tokens` / `.completion_mask` `[R, T]`. old_logprobs:
    `Rollouts.logprobs` `[R, T]`. reference_logprobs: `token_logprobs` of the frozen reference
    `[R, T]`. advantages: `[R]`. R must divide by `micro_batches`.
    """
    rows = prompts.inputs.input_ids.shape[0]
    chex.assert_shape([tokens, completion_mask, old_logprobs, reference_logprobs], (rows, None))
    chex.assert_shape(advantages, (rows,))
    if micro_batches < 1 or rows % micro_batches:
        raise ValueError(f"{rows} rows do not split into {micro_batches} equal micro-batches")
    size = rows // micro_batches

    def cut(x):  # [R, ...] -> [M, r, ...]; jnp keeps device arrays on the device
        return jnp.reshape(x, (micro_batches, size) + tuple(x.shape[1:]))

    inputs = prompts.inputs
    positions = np.asarray(inputs.positions)
    stacked = ModelInputs(
        input_ids=cut(np.asarray(inputs.input_ids)),
        attention_mask=cut(np.asarray(inputs.attention_mask)),
        positions=jnp.asarray(positions.reshape(3, micro_batches, size, -1).transpose(1, 0, 2, 3)),
        vision=_cut_vision(config, inputs, micro_batches),
    )
    return UpdateBatch(
        inputs=stacked,
        next_position=cut(np.asarray(prompts.next_position, np.int32)),
        tokens=cut(tokens),
        completion_mask=cut(completion_mask),
        old_logprobs=cut(old_logprobs),
        reference_logprobs=cut(reference_logprobs),
        advantages=cut(advantages),
    )


def _cut_vision(config: ModelConfig, inputs: ModelInputs, micro_batches: int):
    """Each micro-batch's own image patches, `[M, patches, ...]`, padded to one count.

    A row's patches follow those of the rows above it (`prompt_rows` packs them in row order),
    and it has `merge**2` of them per image token, so a micro-batch's patches are one slice."""
    if inputs.vision is None:
        return None
    if inputs.chunk_mask is not None:
        raise ValueError("rows with a chunk_mask (packed branches) are not SAPO prompt rows")
    merge = config.vision.spatial_merge_size
    ids, mask = np.asarray(inputs.input_ids), np.asarray(inputs.attention_mask, bool)
    per_row = ((ids == config.image_token_id) & mask).sum(axis=1) * merge * merge
    per_micro = per_row.reshape(micro_batches, -1).sum(axis=1)
    starts = np.concatenate([[0], np.cumsum(per_micro)])
    vision = jax.tree.map(np.asarray, inputs.vision)
    if starts[-1] > vision.pixel_values.shape[0]:
        raise ValueError(f"{starts[-1]} patches needed, the rows carry {len(vision.pixel_values)}")
    # The same rounding as `prompt_rows`: few compiled shapes.
    patches = max(64, 1 << (int(per_micro.max()) - 1).bit_length())
    pieces = [
        pad_vision(jax.tree.map(lambda x, a=a, b=b: x[a:b], vision), patches, merge)
        for a, b in zip(starts[:-1], starts[1:], strict=True)
    ]
    return jax.tree.map(lambda *xs: np.stack(xs), *pieces)


def init_optimizer_state(optimizer: Optimizer, params) -> optax.OptState:
    """The optimizer state for `params` (the trainable state of the split draft)."""
    return _transformation(optimizer).init(params)


def _transformation(optimizer: Optimizer) -> optax.GradientTransformation:
    return make_optimizer(optimizer) if isinstance(optimizer, TrainConfig) else optimizer


@functools.partial(
    jax.jit, static_argnums=(0, 1, 2), static_argnames=("mesh",), donate_argnums=(3, 4)
)
def sapo_update(
    graphdef,
    optimizer: Optimizer,
    config: UpdateConfig,
    params,
    opt_state: optax.OptState,
    batch: UpdateBatch,
    *,
    mesh: Mesh | None = None,
):
    """One policy-gradient step of the draft `(graphdef, params)` on `batch`.

    graphdef: static, from `nnx.split(draft)` (or `StaticGraph.split`, with params its leaves).
    params and opt_state are donated: their buffers are reused for the result, so the caller
    must hold nothing else in them. In particular the frozen reference draft must be a separate
    copy (e.g. `jax.tree.map(jnp.copy, params)` before training starts), not the same arrays.
    mesh: where params are sharded by the rule table (`state_shardings` + `device_put`), pass
    their mesh: every `nnx.Variable` of the new params and optimizer state (optax's moments
    keep the params' variables and their `axes`) is then constrained to its rule-table
    sharding, since XLA left alone may return a small vector replicated that came in sharded.
    Place the batch with `place_batch`.

    Returns (params, opt_state, metrics); metrics are float32 scalars over all unmasked tokens of
    the batch: `loss`, `kl`, `clip_fraction`, `ratio_mean` (token means), `grad_norm` (of the
    summed gradient, before any clipping in the optimizer), `tokens`, and `skipped` (1.0 where a
    non-finite loss or gradient left params and opt_state as they were).
    """
    tx = _transformation(optimizer)
    policy_loss = get("policy_loss", config.policy_loss)
    total_tokens = jnp.maximum(batch.completion_mask.sum(), 1).astype(jnp.float32)

    def weighted_loss(p, micro: UpdateBatch):
        rows = PromptRows(micro.inputs, micro.next_position, group_size=1)
        policy = token_logprobs(
            graphdef, p, rows, micro.tokens, micro.completion_mask, config.sampling, config.remat
        )
        loss, metrics = policy_loss(
            policy,
            micro.old_logprobs,
            micro.reference_logprobs,
            micro.advantages,
            micro.completion_mask,
            epsilon=config.epsilon,
            beta=config.beta,
        )
        # Token means become token sums over the batch total: their sum over micro-batches is
        # the token mean over the whole batch. An empty micro-batch gives 0 (and weighs 0).
        share = micro.completion_mask.sum().astype(jnp.float32) / total_tokens
        metrics = {"loss": loss, **metrics}
        return loss * share, {k: v * share for k, v in metrics.items()}

    grad_fn = jax.value_and_grad(weighted_loss, has_aux=True)

    def accumulate(carry, micro):
        grads, sums = carry
        (_, metrics), micro_grads = grad_fn(params, micro)
        grads = jax.tree.map(lambda g, m: g + m.astype(jnp.float32), grads, micro_grads)
        return (grads, jax.tree.map(jnp.add, sums, metrics)), None

    # Sums in float32 whatever the params' dtype: bf16 sums of M micro-gradients lose bits.
    zero_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    zero_metrics = jax.eval_shape(weighted_loss, params, jax.tree.map(lambda x: x[0], batch))[1]
    zero_metrics = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_metrics)
    # With one micro-batch the scan is a single turn; it keeps one code path for every M.
    (grads, metrics), _ = jax.lax.scan(accumulate, (zero_grads, zero_metrics), batch)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)

    grad_norm = optax.tree.norm(grads)
    # grad_norm is not finite exactly when some gradient entry is not (or the sum overflows).
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)

    def apply(params, opt_state):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    # cond, not where: a skipped step runs no optimizer arithmetic, and the kept branch returns
    # the donated inputs themselves, so they come back bit-equal.
    params, opt_state = jax.lax.cond(
        finite, apply, lambda params, opt_state: (params, opt_state), params, opt_state
    )
    if mesh is not None:
        params, opt_state = _constrain(params, mesh), _constrain(opt_state, mesh)
    metrics = {
        **metrics,
        "grad_norm": grad_norm,
        "tokens": batch.completion_mask.sum().astype(jnp.float32),
        "skipped": (~finite).astype(jnp.float32),
    }
    return params, opt_state, metrics


def _constrain(tree, mesh: Mesh):
    """Pins every `nnx.Variable` of `tree` to its rule-table sharding (other leaves as XLA
    chooses: optimizer step counters and the like are scalars)."""

    def pin(leaf):
        if isinstance(leaf, nnx.Variable):
            sharding = variable_sharding(leaf, mesh)
            return leaf.copy(jax.lax.with_sharding_constraint(leaf.get_value(), sharding))
        return leaf

    return jax.tree.map(pin, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def place_batch(batch: UpdateBatch, mesh: Mesh | None) -> UpdateBatch:
    """Places `batch` on `mesh` with its rows split over the batch mesh axes (where they divide,
    by the project's rule table) and the image patches replicated (they are not per row)."""
    if mesh is None:
        return batch

    def put(x, row_axis: int | None):
        x = np.asarray(x)
        logical = [None] * x.ndim
        if row_axis is not None:
            logical[row_axis] = "batch"
        spec = logical_to_spec(logical, x.shape, mesh)
        return jax.device_put(x, NamedSharding(mesh, spec))

    rows = functools.partial(put, row_axis=1)
    inputs = batch.inputs
    return UpdateBatch(
        inputs=ModelInputs(
            input_ids=rows(inputs.input_ids),
            attention_mask=rows(inputs.attention_mask),
            positions=put(inputs.positions, row_axis=2),
            vision=jax.tree.map(functools.partial(put, row_axis=None), inputs.vision),
        ),
        next_position=rows(batch.next_position),
        tokens=rows(batch.tokens),
        completion_mask=rows(batch.completion_mask),
        old_logprobs=rows(batch.old_logprobs),
        reference_logprobs=rows(batch.reference_logprobs),
        advantages=rows(batch.advantages),
    )
