"""Device-side building blocks of every decoding mode, over split (graphdef, state).

A model's per-request state is a `Session`: its KV cache holding the committed tokens and the
next-token logits after them. Everything that touches the device is a plain `jax.jit` function:

- `prefill`: the prompt (text + images) into an empty cache.
- `extend`: a right-padded chunk of text tokens per row into the cache, returning the logits at
  chosen positions (verification reads the judge verdicts and the logits after each candidate).
- `extend_tree`: the same for a tree-shaped chunk (a verification pass: drafted steps plus a
  judge suffix after each), also returning the greedy token at every position.
- `generate_steps`: up to W reasoning steps per row inside a single `lax.while_loop` (a draft
  window; one step is `ModelRunner.step`), stopping per row on the step delimiter, EOS or the
  step cap, with each step's end and the logits after it (what a rollback returns to); the cache
  is donated and updated in place.

Rows that finish early keep running in the batch with their tokens masked out; each function ends
by rolling every row back to exactly its own committed length, so caches never hold holes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from dreamr_jax.models.generate import StaticGraph, merge, prefill
from dreamr_jax.models.inputs import ModelInputs, prepare_inputs
from dreamr_jax.models.kv_cache import KVCache, init_cache, rollback
from dreamr_jax.models.logits import greedy_tokens, logits_at
from dreamr_jax.models.sampling import GREEDY, Sampling, filter_logits, sample


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Session:
    """cache: KV cache of the committed tokens; logits: `[batch, vocab]` next-token logits."""

    cache: KVCache
    logits: jax.Array

    @property
    def batch(self) -> int:
        return self.logits.shape[0]


def _text_positions(mask: jax.Array, next_position: jax.Array) -> jax.Array:
    """M-RoPE positions `[3, batch, t]` of a right-padded text chunk (all three rows equal)."""
    pos = next_position[:, None] + jnp.cumsum(mask, axis=1) - 1
    return jnp.broadcast_to(jnp.where(mask, pos, 0)[None], (3, *mask.shape)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=4)
def extend(graphdef, state, tokens, mask, cache: KVCache, gather, logits_before):
    """Appends a right-padded chunk to every row.

    tokens, mask: `[batch, t]` (mask True on the first n_b tokens of row b).
    gather: `[batch, g]` chunk indices whose next-token logits to return.
    logits_before: `[batch, vocab]`, the rows' next-token logits before the chunk.
    Returns logits `[batch, g, vocab]` float32, the cache (each row exactly n_b tokens longer)
    and the next-token logits after each row's chunk `[batch, vocab]` (unchanged where n_b = 0).
    """
    model = merge(graphdef, state)
    start = cache.length
    inputs = ModelInputs(tokens, mask, _text_positions(mask, cache.next_position), None)
    hidden, cache = model.hidden_states(inputs, cache)
    n = mask.sum(axis=1).astype(jnp.int32)
    cache = rollback(cache, start + n, cache.next_position)
    last = jnp.maximum(n - 1, 0)[:, None]
    picked = jnp.take_along_axis(hidden, jnp.concatenate([gather, last], axis=1)[..., None], 1)
    logits = model.logits(picked)
    after = jnp.where((n > 0)[:, None], logits[:, -1], logits_before)
    return logits[:, :-1], cache, after


@functools.partial(jax.jit, static_argnums=0, donate_argnums=6)
def extend_tree(
    graphdef, state, tokens, mask, offsets, chunk_mask, cache: KVCache, gather, logits_before
):
    """Appends a chunk whose tokens form a tree rather than a chain (one row per batch entry).

    tokens, mask, offsets: `[batch, t]`; offsets are text positions relative to the cache's
    next position (branches may reuse positions). chunk_mask: `[batch, t, t]`, which chunk
    tokens each token sees. gather: `[batch, 2 * s]`. logits_before: `[batch, vocab]`, the
    next-token logits before the chunk. Returns the logits at the first s and at the last s
    gathered positions (`[batch, s, vocab]` each); the model's greedy choice for each chunk
    token's position `[batch, t]` (the argmax of the logits before it: before the chunk for
    token 0, else after the token in front of it, which for a chain is its prefix); the cache
    with the whole chunk written (the caller rolls it back to the branch it keeps) and its
    length and next position `[batch]` from before the chunk.
    """
    model = merge(graphdef, state)
    pos = jnp.where(mask, cache.next_position[:, None] + offsets, 0).astype(jnp.int32)
    inputs = ModelInputs(
        tokens, mask, jnp.broadcast_to(pos[None], (3, *pos.shape)), None, chunk_mask
    )
    start = (cache.length, cache.next_position)
    hidden, cache = model.hidden_states(inputs, cache)
    logits = logits_at(model, hidden, gather)
    half = gather.shape[1] // 2
    # The greedy token before each chunk token: from the logits before the chunk for the first,
    # else after the token in front of it (a chunk of positions at a time).
    first = jnp.argmax(logits_before, axis=-1).astype(jnp.int32)[:, None]
    greedy = jnp.concatenate([first, greedy_tokens(model, hidden[:, :-1])], axis=1)
    return logits[:, :half], logits[:, half:], greedy, cache, start


def feed_token(model, token, active, cache: KVCache, logits):
    """Feeds one token per row `[batch]` (rows not `active` feed nothing) and returns the cache
    and the next-token logits `[batch, vocab]` (unchanged for inactive rows)."""
    feed = jnp.maximum(token, 0)[:, None]
    positions = _text_positions(active[:, None], cache.next_position)
    hidden, cache = model.hidden_states(ModelInputs(feed, active[:, None], positions, None), cache)
    return cache, jnp.where(active[:, None], model.logits(hidden[:, 0]), logits)


def feed_rows(model, token, active, cache: KVCache, logits):
    """`feed_token` where a row not `active` also takes no slot of its cache (its length would
    grow with every call otherwise): the device loops over a batch of requests feed rows in
    play only."""
    fed, logits = feed_token(model, token, active, cache, logits)
    return dataclasses.replace(fed, length=cache.length + active), logits


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Branches:
    """Rows decoded side by side in one cache row, so that no row copies it (the target's own
    step after each prefix of a verified window: `Verification.target_steps`). Branch i sees the
    row's slots below `prefix_end[i]` and its own tokens, which go to slots `base + s * rows + i`
    (its token s): each decoding round writes one token per branch as one chunk.

    cache: the one-row KVCache; its length is the next round's first slot.
    prefix_end: `[rows]` int32. next_position: `[rows]` int32, the position of each branch's
    next token. base: `[]` int32, at or past every prefix's end.
    """

    cache: KVCache
    prefix_end: jax.Array
    next_position: jax.Array
    base: jax.Array


def feed_branches(model, token, active, branches: Branches, logits):
    """`feed_token` for `Branches`: one token per branch `[rows]` into the shared row."""
    cache, w = branches.cache, token.shape[0]
    slots = jnp.arange(cache.max_len)[None, :]
    own = (slots >= branches.base) & ((slots - branches.base) % w == jnp.arange(w)[:, None])
    sees = (slots < branches.prefix_end[:, None]) | own  # [rows, max_len]
    pos = jnp.where(active, branches.next_position, 0).astype(jnp.int32)
    inputs = ModelInputs(
        jnp.maximum(token, 0)[None],
        active[None],
        jnp.broadcast_to(pos[None, None], (3, 1, w)),
        cache_mask=sees[None],
    )
    hidden, cache = model.hidden_states(inputs, cache)
    logits = jnp.where(active[:, None], model.logits(hidden[0]), logits)
    moved = branches.next_position + active
    return dataclasses.replace(branches, cache=cache, next_position=moved), logits


@functools.partial(jax.jit, static_argnums=5, donate_argnums=0)
def _take_branch(cache: KVCache, branches: Branches, logits, row, n, max_tokens: int) -> Session:
    w = logits.shape[0]
    s = jnp.arange(max_tokens)
    src = jnp.minimum(branches.base + s * w + row, cache.max_len - 1)
    dst = jnp.where(s < n, branches.prefix_end[row] + s, cache.max_len)  # past n: dropped
    k = cache.k.at[:, :, :, dst].set(cache.k[:, :, :, src], mode="drop")
    v = cache.v.at[:, :, :, dst].set(cache.v[:, :, :, src], mode="drop")
    valid = cache.valid.at[:, dst].set(True, mode="drop")
    moved = KVCache(k, v, valid, cache.length, cache.next_position)
    end = (branches.prefix_end[row] + n)[None]
    return Session(rollback(moved, end, branches.next_position[row][None]), logits[row][None])


def take_branch(branches: Branches, logits, row: int, n: int, max_tokens: int) -> Session:
    """Branch `row`'s session: its prefix, then its `n` tokens moved in behind it (at most
    `max_tokens` slots copied, never the cache), and the logits `[rows, vocab]` row after them.
    Donates `branches`."""
    rest = dataclasses.replace(branches, cache=None)  # the cache alone is donated
    return _take_branch(branches.cache, rest, logits, np.int32(row), np.int32(n), max_tokens)


def until_a_row_finishes(state: dict):
    """The device loops' condition over a batch of rows (`state` with `active` and `done`
    `[rows]`): a row is in play, and none has finished, whose row the host then refills."""
    return jnp.any(state["active"] & ~state["done"]) & ~jnp.any(state["active"] & state["done"])


@functools.partial(
    jax.jit,
    static_argnums=(0, 6, 7, 8, 9, 10),
    static_argnames=("keep_marks", "keep_dists", "branches"),
    donate_argnums=3,
)
def generate_steps(
    graphdef,
    state,
    logits,
    cache: KVCache,
    key,
    budget,
    max_steps: int,
    max_step_tokens: int,
    sampling: Sampling,
    stop_ids: tuple[int, ...],
    eos_ids: tuple[int, ...],
    min_confidence=None,
    step_limit=None,
    *,
    in_step,
    keep_marks: bool = True,
    keep_dists: bool = False,
    active=None,
    branches: bool = False,
):
    """Up to `max_steps` steps per row in one device loop (a draft window): no host round trip
    between steps. A row stops after EOS, after `max_steps` steps, once it has written `budget`
    `[batch]` tokens, or after a step in which it drew a token with probability below
    `min_confidence` (a traced scalar, or None: not tracked, no softmax per token; the step is
    kept: it is the one to check, and what the row would write after it is likely to be thrown
    away). A step ends after a token of `stop_ids` or `eos_ids`, or at `max_step_tokens`
    tokens. `step_limit` (traced, at most `max_steps`) lowers the step count without a new
    program. Without `keep_marks` the marks are a `[batch, 1, vocab]` placeholder (callers that
    never roll back to a step's end); with `keep_dists` the draw distribution of every token is
    kept (log-probs, for speculative sampling). `in_step` `[batch]`: tokens of each row's
    current step already in the cache (0 at a step boundary; more where the target began the
    step and left it to the draft, the `resume` fallback), so the first step reaches
    `max_step_tokens` that much sooner and every step is cut where the target alone would cut
    it. `active` `[batch]` (default all): rows that write nothing (a
    batch's empty or finished rows). With `branches`, `cache` is a `Branches`, the rows its
    branches, and it is returned as the loop left it (`take_branch` keeps one).

    Returns tokens `[batch, max_steps * max_step_tokens]` (-1 past the end), ends `[batch,
    max_steps]` (tokens written through each step, 0 for steps not written), the number of steps
    `[batch]`, marks `[batch, max_steps + 1, vocab]` (next-token logits before the first step
    and after each step), the log-probs `[batch, max_steps * max_step_tokens, vocab]` (a
    `[1, 1, 1]` placeholder without `keep_dists`), the cache (each row as long as its steps) and
    the logits after them.
    """
    model = merge(graphdef, state)
    b, vocab = logits.shape
    stop = jnp.asarray(stop_ids + eos_ids, jnp.int32)
    eos = jnp.asarray(eos_ids, jnp.int32)
    rows = jnp.arange(b)
    feed = feed_branches if branches else feed_token
    step_limit = max_steps if step_limit is None else jnp.minimum(step_limit, max_steps)

    def cond(carry):
        i, active = carry[0], carry[3]
        return (i < max_steps * max_step_tokens) & jnp.any(active)

    def body(carry):
        i, tokens, log_probs, active, n, in_step, sure, steps, ends, marks, cache, logits, key = (
            carry
        )
        key, sub = jax.random.split(key)
        drawn = sample(logits, sub, sampling)
        if keep_dists:
            scaled = logits if sampling.greedy else filter_logits(logits, sampling)
            at = jnp.where(active, n, max_steps * max_step_tokens)  # (dropped)
            log_probs = log_probs.at[rows, at].set(jax.nn.log_softmax(scaled, -1), mode="drop")
        if min_confidence is not None:
            scaled = logits if sampling.greedy else filter_logits(logits, sampling)
            prob = jnp.take_along_axis(jax.nn.softmax(scaled, axis=-1), drawn[:, None], 1)[:, 0]
            sure = jnp.minimum(sure, prob)  # the step's least likely token so far
        token = jnp.where(active, drawn, -1)
        tokens = tokens.at[rows, n].set(token, mode="drop")
        cache, logits = feed(model, token, active, cache, logits)
        n, in_step = n + active, in_step + active
        step_ends = active & (jnp.isin(token, stop) | (in_step >= max_step_tokens))
        # Rows whose step did not end write to an index past the end (dropped).
        slot = jnp.where(step_ends, steps, max_steps + 1)
        ends = ends.at[rows, slot].set(n, mode="drop")
        if keep_marks:
            marks = marks.at[rows, slot + 1].set(logits, mode="drop")
        steps = steps + step_ends
        in_step = jnp.where(step_ends, 0, in_step)
        doubtful = False if min_confidence is None else sure < min_confidence
        sure = jnp.where(step_ends, 1.0, sure)
        active = active & ~(
            step_ends & (jnp.isin(token, eos) | (steps >= step_limit) | (n >= budget) | doubtful)
        )
        carry = (i + 1, tokens, log_probs, active, n, in_step, sure, steps, ends, marks)
        return *carry, cache, logits, key

    zeros = jnp.zeros((b,), jnp.int32)
    size = max_steps * max_step_tokens
    carry = (
        0,
        jnp.full((b, size), -1, jnp.int32),
        jnp.zeros((b, size, vocab) if keep_dists else (1, 1, 1), jnp.float32),
        jnp.ones((b,), bool) if active is None else active,
        zeros,
        jnp.asarray(in_step, jnp.int32),
        jnp.ones((b,), jnp.float32),
        zeros,
        jnp.zeros((b, max_steps), jnp.int32),
        jnp.zeros((b, max_steps + 1 if keep_marks else 1, vocab), logits.dtype)
        .at[:, 0]
        .set(logits),
        cache,
        logits,
        key,
    )
    _, tokens, log_probs, _, n, _, _, steps, ends, marks, out, logits, _ = jax.lax.while_loop(
        cond, body, carry
    )
    if not branches:
        out = rollback(out, cache.length + n, out.next_position)
    return tokens, ends, steps, marks, log_probs, out, logits


# The session helpers below run between the jitted model calls of every decoding round. As a
# handful of eager ops they cost about a millisecond a call on CPU, more than a draft step, so
# each is one jitted program. Those that only cut rows back touch the bookkeeping alone (k and v
# left out, then put back): a jitted function that returns k and v copies them.


def _bookkeeping(cache: KVCache) -> KVCache:
    return dataclasses.replace(cache, k=None, v=None)


@jax.jit
def _select_rows(session: Session, rows) -> Session:
    cache = session.cache
    return Session(
        KVCache(
            k=cache.k[:, rows],
            v=cache.v[:, rows],
            valid=cache.valid[rows],
            length=cache.length[rows],
            next_position=cache.next_position[rows],
        ),
        session.logits[rows],
    )


def select_rows(session: Session, rows) -> Session:
    """The sessions of `rows` (a list of batch indices), as a new batch."""
    return _select_rows(session, np.asarray(rows, np.int32))


@jax.jit
def _rows_at(one_row: KVCache, length, position, offsets, logits_parts, picks):
    n, slots = offsets.shape[0], one_row.valid.shape[1]
    rows = dataclasses.replace(one_row, valid=jnp.broadcast_to(one_row.valid, (n, slots)))
    rows = rollback(rows, length + offsets, position + offsets)
    return rows, jnp.concatenate(logits_parts)[picks]


def rows_at(session: Session, length, position, offsets, logits_parts, picks) -> Session:
    """From a one-row session whose cache held `length` `[1]` slots (next position `position`
    `[1]`) before a chunk: len(offsets) rows, row i cut back to `offsets[i]` tokens of the
    chunk, with next-token logits row `picks[i]` of the `logits_parts` (a tuple of `[m_j,
    vocab]` arrays) stacked. One row shares the session's k and v; more rows copy them."""
    offsets = np.asarray(offsets, np.int32)
    cache = session.cache
    if len(offsets) > 1:
        cache = select_rows(session, [0] * len(offsets)).cache
    rows, logits = _rows_at(
        _bookkeeping(session.cache),
        length,
        position,
        offsets,
        tuple(logits_parts),
        np.asarray(picks, np.int32),
    )
    return Session(dataclasses.replace(rows, k=cache.k, v=cache.v), logits)


@jax.jit
def _branches_at(bookkeeping: KVCache, length, position, offsets, chain_end, logits_parts, picks):
    base = length[0] + chain_end  # where the branches' tokens go
    cache = dataclasses.replace(bookkeeping, length=base[None])
    branches = Branches(cache, length + offsets, position + offsets, base)
    return branches, jnp.concatenate(logits_parts)[picks]


def branches_at(session: Session, length, position, offsets, chain_end: int, logits_parts, picks):
    """`rows_at` as `Branches` of the one row, none copying it: branch i sees the first
    `offsets[i]` tokens of the chunk, and the branches write from `chain_end` tokens into it on.
    Returns the branches and their logits `[rows, vocab]`."""
    cache = session.cache
    branches, logits = _branches_at(
        _bookkeeping(cache),
        length,
        position,
        np.asarray(offsets, np.int32),
        np.int32(chain_end),
        tuple(logits_parts),
        np.asarray(picks, np.int32),
    )
    branches.cache = dataclasses.replace(branches.cache, k=cache.k, v=cache.v)
    return branches, logits


@jax.jit
def _truncate(cache: KVCache, drop) -> KVCache:
    return rollback(cache, cache.length - drop, cache.next_position - drop)


def truncate(session: Session, drop: int, logits: jax.Array) -> Session:
    """Drops the last `drop` tokens of every row and sets the next-token logits."""
    cache = session.cache
    cut = _truncate(_bookkeeping(cache), np.int32(drop))
    return Session(dataclasses.replace(cut, k=cache.k, v=cache.v), logits)


# Eager array ops cost ~0.1 ms each on CPU, more than a draft token: the per-request cache and
# the per-pass row picks are one small program each.
@functools.cache
def _cache_maker(sharding: NamedSharding | None):
    """`init_cache` as one program whose cache is made on `sharding`'s devices (None: the default
    device). Made there, not put there: `device_put` of a host value onto devices of several
    processes checks it is equal on all of them, a collective over every process that can meet
    another model's programs in flight and mix their messages up."""
    return jax.jit(init_cache, static_argnums=(0, 1, 2, 3), out_shardings=sharding)


@jax.jit
def _first_row(*arrays):
    return tuple(a[0] for a in arrays)


def chunk_width(n: int) -> int:
    """Padded length of an n-token chunk: a multiple of 16 up to 128, then of 32: few compiled
    shapes, and little of a verification pass (compute-bound, ~linear in its width) spent on
    padding."""
    step = 16 if n <= 128 else 32
    return max(16, -(-n // step) * step)


def pad_chunks(
    rows: Sequence[Sequence[int]], pad_id: int, min_width: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads token rows: ids `[batch, t]` int32 and mask `[batch, t]` bool. t is the next
    power of two of the longest row (and of `min_width`), so chunks of any length (a committed
    step fed to the draft, sd's proposals) reuse a handful of compiled shapes."""
    width = 1 << (max(min_width, max(len(r) for r in rows)) - 1).bit_length()
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = True
    return ids, mask


@dataclasses.dataclass(frozen=True)
class JudgeTree:
    """Every row's chain and judge queries as one tree-shaped chunk (host arrays).

    tokens, mask, offsets: `[rows, width]` (offsets: text positions relative to the row's prompt
    end; a suffix copy reuses the positions after its step). seen: `[rows, width, width]`, which
    chunk tokens each token attends to. verdict_at: `[rows, slots]`, the last suffix token of
    each step's query (0 past the row's steps).
    """

    tokens: np.ndarray
    mask: np.ndarray
    offsets: np.ndarray
    seen: np.ndarray
    verdict_at: np.ndarray


def judge_tree(
    tokens: np.ndarray,
    lengths: np.ndarray,
    step_ends: np.ndarray,
    steps: np.ndarray,
    suffix: tuple[int, ...],
    pad_id: int,
    slots: int,
) -> JudgeTree:
    """The tree-shaped verification chunk of each row: chain `tokens[r, :lengths[r]]` (`[rows, T]`,
    `[rows]`), then a copy of `suffix` after each of its `steps[r]` steps (`step_ends` `[rows,
    max_steps]`). Padded to `chunk_width` of the longest row and to `slots` verdicts per row."""
    rows, m = len(tokens), len(suffix)
    width = chunk_width(int(np.max(lengths + steps * m)))
    ids = np.full((rows, width), pad_id, np.int32)
    mask = np.zeros((rows, width), bool)
    offsets = np.zeros((rows, width), np.int32)
    seen = np.zeros((rows, width, width), bool)
    verdict_at = np.zeros((rows, slots), np.int32)
    own = np.tril(np.ones((m, m), bool))
    for r in range(rows):
        n = int(lengths[r])
        ids[r, :n], mask[r, :n], offsets[r, :n] = tokens[r, :n], True, np.arange(n)
        seen[r, :n, :n] = np.tril(np.ones((n, n), bool))
        for i, end in enumerate(step_ends[r, : steps[r]]):
            lo = n + i * m
            ids[r, lo : lo + m], mask[r, lo : lo + m] = suffix, True
            offsets[r, lo : lo + m] = end + np.arange(m)
            seen[r, lo : lo + m, :end] = True
            seen[r, lo : lo + m, lo : lo + m] = own
            verdict_at[r, i] = lo + m - 1
    return JudgeTree(ids, mask, offsets, seen, verdict_at)


_RUNNERS: dict[tuple[int, str], ModelRunner] = {}


@dataclasses.dataclass
class ModelRunner:
    """A model split once for the hot loop, with the token ids that end a step."""

    model: object  # Qwen3VL
    stop_ids: tuple[int, ...]
    eos_ids: tuple[int, ...]
    pad_id: int

    def __post_init__(self):
        self.graphdef, self.state = StaticGraph.split(self.model)  # state: flat leaves
        self.config = self.model.config
        sharding = self.state[0].sharding
        self.devices = frozenset(sharding.device_set)
        # A model placed on a mesh (a submesh of its own) keeps its caches there, replicated:
        # a cache on another device could not meet the weights in one program.
        self.cache_sharding = (
            NamedSharding(sharding.mesh, PartitionSpec())
            if isinstance(sharding, NamedSharding)
            else None
        )

    @classmethod
    def create(cls, model, tokenizer, delimiter: str) -> ModelRunner:
        """Stop tokens: every vocabulary entry whose text contains the delimiter (a tokenizer may
        merge it with the punctuation before it, e.g. Qwen's ".\\n\\n")."""
        # One runner per model: compiled programs are cached per runner (its graph is a static
        # argument hashed by identity), so engines over the same model share them.
        cached = _RUNNERS.get((id(model), delimiter))
        if cached is not None and cached.model is model:
            return cached
        model.config.require_generation_ids()
        vocab = len(tokenizer)
        texts = tokenizer.batch_decode([[i] for i in range(vocab)])
        stop = tuple(i for i, t in enumerate(texts) if delimiter in t)
        if not stop:
            raise ValueError(f"no token of the tokenizer contains the delimiter {delimiter!r}")
        cfg = model.config
        runner = cls(model, stop, tuple(cfg.eos_token_ids), cfg.pad_token_id)
        _RUNNERS[(id(model), delimiter)] = runner
        return runner

    def start(self, inputs: ModelInputs, max_len: int) -> Session:
        """Prefill of a one-row prompt."""
        cache = self.empty(inputs.input_ids.shape[0], max_len)
        logits, cache = prefill(self.graphdef, self.state, inputs, cache)
        return Session(cache, logits)

    def empty(self, rows: int, max_len: int) -> KVCache:
        """An empty cache of `rows` rows, on the model's devices."""
        make = _cache_maker(self.cache_sharding)
        return make(self.config.text, rows, max_len, self.model.dtype)

    def prompt_inputs(self, ids: Sequence[int], pixel_values, grid) -> ModelInputs:
        inputs, _ = prepare_inputs(self.config, np.asarray([ids]), None, pixel_values, grid)
        return inputs

    def step(
        self,
        session: Session,
        key,
        max_tokens: int,
        sampling: Sampling = GREEDY,
        *,
        stop: bool = True,
        keep_dists: bool = False,
        limit: int | None = None,
    ):
        """Generates one step per row (or up to `max_tokens` tokens, EOS only, with stop=False),
        of at most `limit` tokens (default `max_tokens`; one program for every limit): a window
        of one step (`generate_steps`), which counts the tokens past `limit` as already in it.
        Returns (tokens `[batch, max_tokens]`, n `[batch]`, log_probs, session), all still on
        device. Donates `session`."""
        tokens, n, log_probs, cache, logits = self._step(
            session.cache, session.logits, key, max_tokens, sampling, stop, keep_dists, limit
        )
        return tokens, n, log_probs, Session(cache, logits)

    def branch_steps(
        self, branches: Branches, logits, key, max_tokens: int, sampling: Sampling = GREEDY
    ):
        """`step` of every branch of `branches` (logits `[rows, vocab]` before each): tokens
        `[rows, max_tokens]`, n `[rows]`, the branches and the logits after them (`take_branch`
        keeps one). Donates `branches`."""
        tokens, n, _, branches, logits = self._step(
            branches, logits, key, max_tokens, sampling, branches=True
        )
        return tokens, n, branches, logits

    def _step(
        self,
        cache,
        logits,
        key,
        max_tokens,
        sampling,
        stop=True,
        keep_dists=False,
        limit=None,
        branches=False,
    ):
        rows = logits.shape[0]
        written = max_tokens - min(max_tokens, max_tokens if limit is None else limit)
        tokens, ends, _, _, log_probs, cache, logits = generate_steps(
            self.graphdef,
            self.state,
            logits,
            cache,
            key,
            np.full((rows,), max_tokens, np.int32),
            1,
            max_tokens,
            sampling,
            self.stop_ids if stop else (),
            self.eos_ids,
            in_step=np.full((rows,), written, np.int32),
            keep_marks=False,
            keep_dists=keep_dists,
            branches=branches,
        )
        return tokens, ends[:, 0], log_probs, cache, logits

    def steps(
        self, session: Session, *args, **kwargs
    ) -> tuple[list[list[int]], jax.Array, Session]:
        """`dispatch_steps` and `read_steps`: the steps as token lists, the marks and the
        session after the steps. Donates `session`."""
        return self.read_steps(self.dispatch_steps(session, *args, **kwargs))

    def dispatch_steps(
        self,
        session: Session,
        key,
        budget: int,
        max_steps: int,
        max_step_tokens: int,
        sampling: Sampling = GREEDY,
        min_confidence: float | None = None,
        keep_marks: bool = True,
        in_step: int = 0,
    ) -> tuple:
        """Up to `max_steps` steps of a one-row session in one device call (`generate_steps`),
        stopping after EOS, once `budget` tokens are written or after a step with a token drawn
        at probability below `min_confidence`; the first step holds `in_step` tokens already
        (`generate_steps`). Dispatched and not waited for: returns the device arrays that
        `read_steps` turns into (the steps as token lists, marks `[1, max_steps + 1, vocab]`:
        the logits before each step and after the last, or a placeholder without `keep_marks`,
        the session after the steps). Donates `session`."""
        tokens, ends, count, marks, _, cache, logits = generate_steps(
            self.graphdef,
            self.state,
            session.logits,
            session.cache,
            key,
            np.full((session.batch,), budget, np.int32),
            max_steps,
            max_step_tokens,
            sampling,
            self.stop_ids,
            self.eos_ids,
            None if min_confidence is None else np.float32(min_confidence),
            in_step=np.full((session.batch,), in_step, np.int32),
            keep_marks=keep_marks,
        )
        return tokens, ends, count, marks, Session(cache, logits)

    @staticmethod
    def read_steps(dispatched: tuple) -> tuple[list[list[int]], jax.Array, Session]:
        """What `steps` returns, from `dispatch_steps`' arrays (waits for them)."""
        tokens, ends, count, marks, session = dispatched
        tokens, ends, count = jax.device_get((tokens, ends, count))  # one host read
        tokens, ends = tokens[0], ends[0, : int(count[0])]
        starts = np.concatenate([[0], ends[:-1]]).astype(int)
        steps = [tokens[s:e].tolist() for s, e in zip(starts, ends, strict=True)]
        return steps, marks, session

    def verify_tree(
        self,
        session: Session,
        steps: Sequence[Sequence[int]],
        suffix: Sequence[int],
        slots: int | None = None,
    ) -> tuple:
        """One row holding `steps` (a chain) and, after them, a copy of `suffix` per step that
        sees only the steps up to its own: every candidate's judge query in one forward pass,
        with no token computed twice.

        The chunk is padded by `chunk_width` and the outputs to `slots` (>= k)
        rows, so a window of any shape reuses a few compiled programs.

        Returns (logits after each step `[slots, vocab]`, logits at the end of each suffix
        `[slots, vocab]`, rows past k are padding; the target's greedy token before each chunk
        token `[width]`, which on the chain is its greedy next token after the tokens before
        it; ends: the chunk length through each step;
        the one-row session holding the whole tree; the cache length and next position before
        it). Donates `session`.
        """
        ends = np.cumsum([len(s) for s in steps])
        chain = [t for s in steps for t in s]
        slots = slots or len(steps)
        tree = judge_tree(
            np.asarray([chain], np.int32),
            np.asarray([len(chain)]),
            np.asarray([ends]),
            np.asarray([len(steps)]),
            tuple(suffix),
            self.pad_id,
            slots,
        )
        after = list(ends - 1) + [0] * (slots - len(steps))
        gather = np.asarray([after + tree.verdict_at[0].tolist()], np.int32)
        # The start length comes back from the device: arrays built on the host here would
        # reach later calls with another sharding, and jit compiles again for that.
        after, verdict, greedy, cache, start = extend_tree(
            self.graphdef,
            self.state,
            tree.tokens,
            tree.mask,
            tree.offsets,
            tree.seen,
            session.cache,
            gather,
            session.logits,
        )
        after, verdict, greedy = _first_row(after, verdict, greedy)
        return after, verdict, greedy, ends, Session(cache, session.logits), start

    def extend(
        self, session: Session, rows: Sequence[Sequence[int]], gather, min_width: int = 1
    ) -> tuple:
        """Appends `rows` (one token list per batch row) and returns (logits at `gather`
        `[batch, g, vocab]`, session whose logits are those after each row's last token).
        Callers keep g fixed (and pass `min_width`) where lengths vary, so one program serves.
        Donates `session`."""
        ids, mask = pad_chunks(rows, self.pad_id, min_width)
        gather = np.asarray(gather, np.int32).reshape(len(rows), -1)
        logits, cache, after = extend(
            self.graphdef, self.state, ids, mask, session.cache, gather, session.logits
        )
        return logits, Session(cache, after)
