"""One tree-shaped verification pass over a window of drafted steps, and sessions cut from it."""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from dreamr_jax.speculative.runner import Session, branches_at, rows_at


@dataclasses.dataclass
class Verification:
    """One tree-shaped verification pass over k drafted steps (`Engine.verify`).

    verdict_logits: `[max(W, k), vocab]` last-position logits of each judge query (rows past k
    are padding). greedy: `[width]`, the target's greedy token before each chunk token.
    starts: `[k + 1]`, where each step starts in the chunk (after a pending token,
    `Engine.verify`), then where the chain ends.
    """

    verdict_logits: jax.Array
    greedy: jax.Array
    starts: np.ndarray
    tree: Session  # one row holding the whole chunk; `first` logits are before it
    start: tuple  # the cache length and next position before the chunk, `[1]` each
    after: jax.Array  # `[slots, vocab]` logits after each step

    def at(self, indices) -> Session:
        """Rows cut back to the first i steps, for each i in `indices`, with the logits after
        them."""
        indices = list(indices)  # logits: the tree's (i = 0), then after[i - 1]
        parts = (self.tree.logits, self.after)
        return rows_at(self.tree, *self.start, self.starts[indices], parts, indices)

    def target_steps(self, runner, indices, key, max_tokens: int, sampling):
        """The target's own step after the first i steps, for each i in `indices`, decoded side
        by side in this pass's row (`Branches`), where `at` would give each a copy of the cache.
        Returns (tokens `[rows, max_tokens]`, n `[rows]`, the branches and their logits), which
        `runner.take_branch` turns into the session of one. The branches write past the chain
        only, so `at` and `cut` read the chain from their row from then on (until a branch is
        taken, which donates it)."""
        indices = list(indices)
        parts = (self.tree.logits, self.after)
        branches, logits = branches_at(
            self.tree, *self.start, self.starts[indices], int(self.starts[-1]), parts, indices
        )
        tokens, n, branches, logits = runner.branch_steps(
            branches, logits, key, max_tokens, sampling
        )
        self.tree = Session(branches.cache, self.tree.logits)
        return tokens, n, branches, logits

    @functools.cached_property
    def greedy_tokens(self) -> np.ndarray:
        """`greedy` on the host, read once per pass."""
        return np.asarray(self.greedy)

    def agreement(self, steps, j: int) -> int:
        """How many leading tokens of drafted step j the target, decoding greedily after the
        same prefix, would have written itself (its choices were computed by this pass)."""
        start = int(self.starts[j])
        same = self.greedy_tokens[start : start + len(steps[j])] == np.asarray(steps[j])
        return len(same) if same.all() else int(np.argmin(same))

    def cut(self, tokens: int) -> Session:
        """One row cut back to the first `tokens` chain tokens. Its logits are a placeholder:
        the caller extends it before decoding, or feeds a pending token at the head of the next
        verification pass (whose greedy choice before that token is then never read)."""
        return rows_at(self.tree, *self.start, [tokens], (self.tree.logits,), [0])
