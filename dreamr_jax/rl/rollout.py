"""SAPO's rollouts: G sampled chains per prompt from the draft, all rows in one device loop, and
the per-token log-probabilities of given chains under a model (teacher-forced, differentiable).

Rows are prompt-major: the G rollouts of prompt p are rows p * G ... p * G + G - 1, as the
advantage estimators (`rl/advantages.py`) group them.

A chain is cut into steps exactly where the engine's step loops cut it (`runner.generate_steps`):
after a stop token (every token whose text holds the step delimiter, `ModelRunner.create`), after
EOS, or once a step holds `max_step_tokens` tokens. A row stops after EOS, or at the end of the
step in which it reached `max_new_tokens` tokens: a step begins only while the chain is shorter
than the budget, as in the engine, so every chain is whole steps (the last one ends at EOS, a
delimiter or the cap), and a chain holds at most `max_new_tokens + max_step_tokens - 1` tokens and
`max_new_tokens` steps. Every row writes at least one token, so a sampled chain has at least one
step; one with no delimiter and no EOS has one step per `max_step_tokens` tokens (one if it is
shorter).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dreamr_jax.config.schema import ModelConfig
from dreamr_jax.data.prompts import PromptBuilder
from dreamr_jax.models.generate import merge, prefill
from dreamr_jax.models.inputs import ModelInputs, pad_vision, prepare_inputs
from dreamr_jax.models.kv_cache import init_cache
from dreamr_jax.models.logits import over_positions
from dreamr_jax.models.processor import process_images
from dreamr_jax.models.sampling import Sampling, filter_logits, sample
from dreamr_jax.speculative.runner import ModelRunner, feed_token

# Prompts are left-padded to a multiple of this (the engine's bucket): few compiled shapes.
PROMPT_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One problem as the model reads it: `PromptBuilder.prompt_ids` and its images as
    `process_images` returns them (patches `[patches, C*T*P*P]`, grids `[images, 3]`)."""

    ids: Sequence[int]
    pixel_values: np.ndarray
    grid: np.ndarray

    @classmethod
    def of(cls, builder: PromptBuilder, processor, question: str, images) -> Prompt:
        pixel_values, grid = process_images(processor, images)
        return cls(builder.prompt_ids(question, [g.tolist() for g in grid]), pixel_values, grid)


@dataclasses.dataclass(frozen=True)
class PromptRows:
    """P prompts, each repeated G times (prompt-major), as one left-padded batch of P * G rows.

    inputs: `ModelInputs` `[rows, S]` with every row's images (vision patches padded to a power
    of two, as the engine pads them). next_position: `[rows]` int32, the M-RoPE position of each
    row's first completion token.
    """

    inputs: ModelInputs
    next_position: np.ndarray
    group_size: int


def prompt_rows(config: ModelConfig, prompts: Sequence[Prompt], group_size: int) -> PromptRows:
    """The rows of `prompts` x `group_size` for a model of `config` (positions and vision
    tables depend on it, so the draft and the target each get their own). Every prompt has
    images, as every request the engine answers does."""
    rows = [prompt for prompt in prompts for _ in range(group_size)]
    width = -(-max(len(row.ids) for row in rows) // PROMPT_BUCKET) * PROMPT_BUCKET
    ids = np.full((len(rows), width), config.pad_token_id, np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, row in enumerate(rows):
        ids[i, width - len(row.ids) :] = row.ids
        mask[i, width - len(row.ids) :] = True
    pixel_values = np.concatenate([row.pixel_values for row in rows])
    grids = np.concatenate([np.asarray(row.grid).reshape(-1, 3) for row in rows])
    inputs, next_position = prepare_inputs(config, ids, mask, pixel_values, grids)
    patches = max(64, 1 << (len(pixel_values) - 1).bit_length())  # few vision shapes
    merge_size = config.vision.spatial_merge_size
    inputs = dataclasses.replace(inputs, vision=pad_vision(inputs.vision, patches, merge_size))
    return PromptRows(inputs, next_position.astype(np.int32), group_size)


@dataclasses.dataclass(frozen=True)
class RolloutSpec:
    """How chains are sampled and cut into steps (static: one compiled loop per spec).

    stop_ids: the tokens that end a step besides EOS (`ModelRunner.stop_ids`); eos_ids end the
    chain; pad_id fills completions after their end.
    """

    max_new_tokens: int
    max_step_tokens: int
    sampling: Sampling
    stop_ids: tuple[int, ...]
    eos_ids: tuple[int, ...]
    pad_id: int

    @classmethod
    def of(
        cls, runner: ModelRunner, max_new_tokens: int, max_step_tokens: int, sampling: Sampling
    ) -> RolloutSpec:
        """The spec of chains written by `runner`'s model, cut as the engine cuts them."""
        return cls(
            max_new_tokens,
            max_step_tokens,
            sampling,
            runner.stop_ids,
            runner.eos_ids,
            runner.pad_id,
        )

    @property
    def completion_tokens(self) -> int:
        """T: the longest chain (the last step begins below the budget and may run to the cap)."""
        return self.max_new_tokens + self.max_step_tokens - 1

    @property
    def max_steps(self) -> int:
        """The most steps a chain can hold: each begins below the budget, with >= 1 token."""
        return self.max_new_tokens


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Rollouts:
    """Sampled chains, one per row (T = `RolloutSpec.completion_tokens`, max_steps =
    `RolloutSpec.max_steps`).

    tokens: `[rows, T]` int32, the chain, then `pad_id`.
    completion_mask: `[rows, T]` bool, True on the chain's tokens.
    logprobs: `[rows, T]` float32, each drawn token's log-probability under the distribution it
        was drawn from (`sampling_log_probs`: the "old" log-probs); 0 after the end.
    lengths: `[rows]` int32, |y|.
    step_ends: `[rows, max_steps]` int32, tokens through each step (step i is
        `tokens[step_ends[i - 1]:step_ends[i]]`, the first from 0); 0 past the row's steps.
    step_mask: `[rows, max_steps]` bool, True on the row's steps (a prefix of each row).
    """

    tokens: jax.Array
    completion_mask: jax.Array
    logprobs: jax.Array
    lengths: jax.Array
    step_ends: jax.Array
    step_mask: jax.Array


def sampling_log_probs(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """Log-probs `[batch, vocab]` float32 of the distribution `sample` draws from for `logits`
    `[batch, vocab]`: scaled by the temperature and filtered by top-k / top-p. Greedy decoding
    draws from a point mass; it reports the model's own distribution (temperature 1) instead."""
    scaled = logits.astype(jnp.float32) if sampling.greedy else filter_logits(logits, sampling)
    return jax.nn.log_softmax(scaled, axis=-1)


def rollout(graphdef, state, prompts: PromptRows, key: jax.Array, spec: RolloutSpec) -> Rollouts:
    """One chain per row of `prompts` (G per prompt), sampled from the model `(graphdef, state)`
    (split by `nnx.split` or `StaticGraph.split`) in one device loop over all rows. The same key
    gives the same rollouts. Returns `Rollouts`, still on the device."""
    return _sample_chains(graphdef, state, prompts.inputs, key, spec)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _sample_chains(graphdef, state, inputs: ModelInputs, key, spec: RolloutSpec) -> Rollouts:
    model = merge(graphdef, state)
    rows, width = inputs.input_ids.shape
    length, max_steps = spec.completion_tokens, spec.max_steps
    # Every row takes a cache slot per loop turn (finished rows feed masked tokens), so the
    # prompt and T slots hold the longest loop.
    cache = init_cache(model.config.text, rows, width + length, model.dtype)
    logits, cache = prefill(graphdef, state, inputs, cache)
    stop = jnp.asarray(spec.stop_ids + spec.eos_ids, jnp.int32)
    eos = jnp.asarray(spec.eos_ids, jnp.int32)
    row_index = jnp.arange(rows)

    def cond(carry):
        i, active = carry[0], carry[3]
        return (i < length) & jnp.any(active)

    def body(carry):
        i, tokens, logprobs, active, n, in_step, steps, ends, cache, logits, key = carry
        key, sub = jax.random.split(key)
        drawn = sample(logits, sub, spec.sampling)
        logprob = jnp.take_along_axis(
            sampling_log_probs(logits, spec.sampling), drawn[:, None], axis=1
        )[:, 0]
        # An active row has written exactly i tokens: all rows start together and never pause.
        tokens = tokens.at[:, i].set(jnp.where(active, drawn, spec.pad_id))
        logprobs = logprobs.at[:, i].set(jnp.where(active, logprob, 0.0))
        cache, logits = feed_token(model, drawn, active, cache, logits)
        n, in_step = n + active, in_step + active
        ends_step = active & (jnp.isin(drawn, stop) | (in_step >= spec.max_step_tokens))
        # Rows whose step did not end write past the last step (dropped).
        ends = ends.at[row_index, jnp.where(ends_step, steps, max_steps)].set(n, mode="drop")
        steps = steps + ends_step
        in_step = jnp.where(ends_step, 0, in_step)
        active = active & ~(ends_step & (jnp.isin(drawn, eos) | (n >= spec.max_new_tokens)))
        return i + 1, tokens, logprobs, active, n, in_step, steps, ends, cache, logits, key

    zeros = jnp.zeros((rows,), jnp.int32)
    carry = (
        0,
        jnp.full((rows, length), spec.pad_id, jnp.int32),
        jnp.zeros((rows, length), jnp.float32),
        jnp.ones((rows,), bool),
        zeros,
        zeros,
        zeros,
        jnp.zeros((rows, max_steps), jnp.int32),
        cache,
        logits,
        key,
    )
    _, tokens, logprobs, _, n, _, steps, ends, _, _, _ = jax.lax.while_loop(cond, body, carry)
    return Rollouts(
        tokens=tokens,
        completion_mask=jnp.arange(length)[None, :] < n[:, None],
        logprobs=logprobs,
        lengths=n,
        step_ends=ends,
        step_mask=jnp.arange(max_steps)[None, :] < steps[:, None],
    )


def token_logprobs(
    graphdef,
    state,
    prompts: PromptRows,
    tokens: jax.Array,
    completion_mask: jax.Array,
    sampling: Sampling,
    remat: bool = False,
) -> jax.Array:
    """Log-probabilities `[rows, T]` float32 of completion `tokens` `[rows, T]` after each row's
    prompt (`prompts` built for this model's config) under the model `(graphdef, state)`, in the
    distribution `sampling` draws from (`sampling_log_probs`); 0 where `completion_mask` `[rows,
    T]` is False. Teacher-forced: one forward pass over prompt + completion, no cache, so it is
    differentiable in `state` (the policy inside `jax.grad`; the frozen reference outside it);
    with `remat` its backward pass recomputes each decoder layer's activations."""
    return _token_logprobs(
        graphdef,
        state,
        prompts.inputs,
        prompts.next_position,
        tokens,
        completion_mask,
        sampling,
        remat,
    )


@functools.partial(jax.jit, static_argnums=(0, 6, 7))
def _token_logprobs(
    graphdef, state, inputs, next_position, tokens, completion_mask, sampling, remat
):
    model = merge(graphdef, state)
    rows, width = inputs.input_ids.shape
    length = tokens.shape[1]
    # Completion tokens continue the text positions after the prompt, as decoding gives them.
    text = jnp.where(completion_mask, next_position[:, None] + jnp.arange(length), 0)
    positions = jnp.concatenate(
        [inputs.positions, jnp.broadcast_to(text[None], (3, rows, length))], axis=2
    )
    sequence = ModelInputs(
        jnp.concatenate([inputs.input_ids, tokens], axis=1),
        jnp.concatenate([inputs.attention_mask, completion_mask], axis=1),
        positions.astype(jnp.int32),
        inputs.vision,
    )
    hidden, _ = model.hidden_states(sequence, remat=remat)

    def picked(logits, token):  # [rows, c, vocab], [rows, c] -> [rows, c]
        log_probs = sampling_log_probs(logits.reshape(-1, logits.shape[-1]), sampling)
        return jnp.take_along_axis(log_probs, token.reshape(-1, 1), axis=1).reshape(token.shape)

    # Token j is predicted at the position before it: the prompt's last (left padding puts
    # every row's there), then completion token j - 1. A chunk of positions at a time: the
    # whole `[rows, length, vocab]` would be gigabytes on Qwen's vocabulary.
    log_probs = over_positions(model, picked, hidden[:, width - 1 : width + length - 1], tokens)
    return jnp.where(completion_mask, log_probs, 0.0)
