"""The frozen target's CPN verdict on every step of every rollout, in one tree-shaped pass.

Each row's chunk is what `ModelRunner.verify_tree` builds for the engine, for a whole chain:
the rollout's tokens, then one copy of the judge suffix per step that sees the chain only through
that step's end (and itself), with its text positions continuing from there. The judge query
after step i is therefore `prompt + steps 1..i + suffix`, exactly the one the engine asks when it
verifies step i; all rows go through `runner.extend_tree` together after one prefill of their
prompts, and p is CPN's (`cpn.cpn_scores`). The same pass gives the target's greedy token at every
chain position, so it also tells which steps are the target's own greedy step word for word: the
engine keeps those whatever the judge says (its fallback would commit the same tokens).

The target gets no gradient: its parameters enter under `jax.lax.stop_gradient`, and the layout is
built on the host from the rollouts, so scoring runs outside any `jax.grad`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from dreamr_jax.data.prompts import PromptBuilder
from dreamr_jax.models.generate import merge, prefill
from dreamr_jax.models.kv_cache import init_cache
from dreamr_jax.parallel.distributed import to_host
from dreamr_jax.rl.rollout import PromptRows, Rollouts
from dreamr_jax.speculative.cpn import cpn_scores
from dreamr_jax.speculative.runner import extend_tree, judge_tree


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepScores:
    """p: `[rows, max_steps]` float32, the target's CPN p of each step; mass: `[rows,
    max_steps]` float32, s+ + s- (below the format floor the target ignored the answer format);
    own: `[rows, max_steps]` bool, the step is the target's greedy step after the row's earlier
    steps, token for token. All 0 / False outside the rollouts' `step_mask`."""

    p: jax.Array
    mass: jax.Array
    own: jax.Array


def score_steps(
    graphdef, state, prompts: PromptRows, rollouts: Rollouts, builder: PromptBuilder
) -> StepScores:
    """CPN p (the format mass, and whether it is the target's own step) of every step of every
    rollout, from the target `(graphdef, state)` asked with `builder`'s judge suffix and positive
    / negative words. `prompts`: the rollouts' prompt rows built for the target's config
    (`prompt_rows`). Reads the rollouts to the host once (the chunk's layout depends on their
    lengths)."""
    tokens, lengths, step_ends, step_mask = to_host(
        (rollouts.tokens, rollouts.lengths, rollouts.step_ends, rollouts.step_mask)
    )
    steps = step_mask.sum(axis=1)
    max_steps = step_mask.shape[1]
    # A power of two verdict slots (at most max_steps): few compiled shapes.
    slots = min(max_steps, 1 << max(0, int(steps.max()) - 1).bit_length())
    tree = judge_tree(
        tokens,
        lengths,
        step_ends,
        steps,
        builder.judge_suffix_ids,
        builder.model.pad_token_id,
        slots,
    )
    return _judge(
        graphdef,
        state,
        prompts.inputs,
        tree.tokens,
        tree.mask,
        tree.offsets,
        tree.seen,
        tree.verdict_at,
        lengths,
        step_ends,
        step_mask,
        builder.positive_ids,
        builder.negative_ids,
    )


@functools.partial(jax.jit, static_argnums=(0, 11, 12))
def _judge(
    graphdef,
    state,
    inputs,
    tokens,
    mask,
    offsets,
    seen,
    verdict_at,
    lengths,
    step_ends,
    step_mask,
    positive_ids,
    negative_ids,
) -> StepScores:
    state = jax.lax.stop_gradient(state)
    model = merge(graphdef, state)
    rows, width = inputs.input_ids.shape
    cache = init_cache(model.config.text, rows, width + tokens.shape[1], model.dtype)
    logits, cache = prefill(graphdef, state, inputs, cache)
    # extend_tree returns two gathered halves (the engine reads the logits after each step in
    # the first); only the verdicts are needed here, so both halves gather them.
    verdicts, _, greedy, _, _ = extend_tree(
        graphdef,
        state,
        tokens,
        mask,
        offsets,
        seen,
        cache,
        jnp.concatenate([verdict_at, verdict_at], axis=1),
        logits,
    )
    p, mass = cpn_scores(verdicts.reshape(-1, verdicts.shape[-1]), positive_ids, negative_ids)
    pad = ((0, 0), (0, step_mask.shape[1] - verdict_at.shape[1]))
    p, mass = (jnp.pad(x.reshape(verdict_at.shape), pad) for x in (p, mass))
    own = _own_steps(tokens, greedy, lengths, step_ends)
    return StepScores(
        jnp.where(step_mask, p, 0.0), jnp.where(step_mask, mass, 0.0), step_mask & own
    )


def _own_steps(tokens, greedy, lengths, step_ends) -> jax.Array:
    """`[rows, max_steps]` bool: every token of the step is the target's greedy token after the
    tokens before it. tokens, greedy: `[rows, width]` (the chain first); lengths `[rows]`;
    step_ends `[rows, max_steps]` (exclusive, 0 past the row's steps)."""
    chain = jnp.arange(tokens.shape[1])[None] < lengths[:, None]
    # Differences counted up to each position: a step is the target's own when none fall in it.
    differ = jnp.cumsum((greedy != tokens) & chain, axis=1)
    differ = jnp.pad(differ, ((0, 0), (1, 0)))  # differ[:, e]: differences before position e
    starts = jnp.pad(step_ends[:, :-1], ((0, 0), (1, 0)))
    through = jnp.take_along_axis(differ, step_ends, axis=1)
    before = jnp.take_along_axis(differ, starts, axis=1)
    return through == before
