"""Continuous batching: `rows` requests in flight in one device loop, each row at its own step
with its own history, a finished row refilled with the next request at once.

A mode that runs as a device loop files a `Lanes` for it (`modes.register(..., lanes=...)`):
`ChainLanes` for one model alone (`chain_loop.py`), `WindowLanes` for `exact` and greedy
`dreamr` with `resume` (`window_loop.py`), `SdLanes` for greedy `sd` (`sd_loop.py`). `RowBatch`
drives any of them: it prefills a request alone (its prompt and images have their own shapes)
and copies its caches into a free row, runs the loop until some row finishes, and hands back the
finished rows' solutions. The shapes are fixed
by the row count and the cache length, so nothing recompiles per request; a request that needs
a longer cache than the batch has grows every row's cache once.

A batch of one row is how these modes answer a single request too (`solve_one`), so batch 1 and
batch 8 run the same code.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from dreamr_jax.models.kv_cache import KVCache
from dreamr_jax.speculative import chain_loop, sd_loop, window_loop
from dreamr_jax.speculative.records import Solution
from dreamr_jax.speculative.runner import ModelRunner, Session

if TYPE_CHECKING:
    from dreamr_jax.speculative.engine import Engine

# What a host read leaves out: the caches and logits stay on the device.
_DEVICE_ONLY = ("cache", "t_cache", "d_cache", "logits", "d_logits", "key")


@jax.jit
def _release(active, done):
    """Rows whose chain is done no longer hold a request (only these two small arrays pass: a
    jitted function that returned the caches unchanged would copy them)."""
    return active & ~done


@functools.partial(jax.jit, static_argnums=1)
def _grow_cache(cache: KVCache, max_len: int) -> KVCache:
    more = max_len - cache.max_len
    pad = ((0, 0), (0, 0), (0, 0), (0, more), (0, 0))
    return dataclasses.replace(
        cache,
        k=jnp.pad(cache.k, pad),
        v=jnp.pad(cache.v, pad),
        valid=jnp.pad(cache.valid, ((0, 0), (0, more))),
    )


def _empty_session(runner: ModelRunner, rows: int, max_len: int) -> Session:
    vocab = runner.config.text.vocab_size
    return Session(runner.empty(rows, max_len), jnp.zeros((rows, vocab), jnp.float32))


class ChainLanes:
    """`target` or `draft` alone over rows (`chain_loop.py`)."""

    def __init__(self, engine: Engine, author: str):
        self.engine, self.author = engine, author
        self.runner = engine.target if author == "target" else engine.draft
        s = engine.spec
        self.spec = chain_loop.ChainSpec(
            s.max_step_tokens,
            s.max_new_tokens,
            self.runner.stop_ids,
            self.runner.eos_ids,
            engine.sampling,
        )
        self._keys: dict[int, jax.Array] = {}

    def prefill(self, inputs, max_len: int) -> tuple[Session]:
        return (self.runner.start(inputs, max_len),)

    def start(self, sessions, active) -> dict:
        (s,) = sessions
        if s.batch not in self._keys:  # every request draws from the engine's first key
            self._keys[s.batch] = jnp.stack([self.engine.key(0)] * s.batch)
        return chain_loop.start_rows(self.spec, s.cache, s.logits, self._keys[s.batch], active)

    def empty(self, rows: int, max_len: int) -> tuple[Session]:
        return (_empty_session(self.runner, rows, max_len),)

    def admit(self, state: dict, row: int, sessions) -> dict:
        (s,) = sessions
        return chain_loop.admit(
            self.spec, state, np.int32(row), s.cache, s.logits, self.engine.key(0)
        )

    def run(self, state: dict) -> dict:
        return chain_loop.decode_chains(self.runner.graphdef, self.runner.state, state, self.spec)

    def grow(self, state: dict, max_len: int) -> dict:
        return {**state, "cache": _grow_cache(state["cache"], max_len)}

    def solution(self, r: dict, row: int) -> Solution:
        tokens = r["tokens"][row, : int(r["n"][row])].tolist()
        sol = Solution([], [], target_calls=int(self.author == "target"))
        for step in self.engine.split_steps(tokens, self.author):
            self.engine.commit(sol, step.tokens, self.author)
        return sol


class _PairLanes:
    """What the loops of draft and target together share: both prefilled, both caches per row,
    the batch built by `window_loop.start_rows` and `admit` from the row state the loop's spec
    makes (`fresh_row`). A subclass sets `spec` and runs its loop."""

    def prefill(self, inputs, max_len: int) -> tuple[Session, Session]:
        return self.engine.start(inputs, max_len)

    def start(self, sessions, active) -> dict:
        t, d = sessions
        return window_loop.start_rows(self.spec, t.cache, d.cache, t.logits, d.logits, active)

    def empty(self, rows: int, max_len: int) -> tuple[Session, Session]:
        e = self.engine
        return _empty_session(e.target, rows, max_len), _empty_session(e.draft, rows, max_len)

    def admit(self, state: dict, row: int, sessions) -> dict:
        t, d = sessions
        return window_loop.admit(
            self.spec, state, np.int32(row), t.cache, d.cache, t.logits, d.logits
        )

    def grow(self, state: dict, max_len: int) -> dict:
        return {
            **state,
            "t_cache": _grow_cache(state["t_cache"], max_len),
            "d_cache": _grow_cache(state["d_cache"], max_len),
        }


class WindowLanes(_PairLanes):
    """`exact` (no judge) and greedy `dreamr` with `resume` (`window_loop.py`)."""

    def __init__(self, engine: Engine, judged: bool):
        self.engine = engine
        s, b = engine.spec, engine.builder
        judge = (b.judge_suffix_ids, b.positive_ids, b.negative_ids) if judged else ()
        self.spec = window_loop.LoopSpec(
            s.window,
            s.max_step_tokens,
            s.max_new_tokens,
            engine.target.stop_ids,
            engine.target.eos_ids,
            engine.target.pad_id,
            *judge,
        )
        self.knobs = (
            np.float32(s.draft_confidence),
            np.float32(s.alpha),
            np.float32(s.format_floor),
        )

    def run(self, state: dict) -> dict:
        t, d = self.engine.target, self.engine.draft
        return window_loop.speculate(
            t.graphdef, t.state, d.graphdef, d.state, state, self.spec, *self.knobs
        )

    def solution(self, r: dict, row: int) -> Solution:
        n = int(r["n"][row])
        mine = {name: value[row] for name, value in r.items()}
        return Solution(
            mine["tokens"][:n].tolist(),
            self.engine.device_records(mine, n),
            proposed=int(mine["proposed"]),
            accepted=int(mine["accepted"]),
            target_calls=int(mine["passes"]),
            format_misses=int(mine["format_misses"]),
        )


class SdLanes(_PairLanes):
    """`sd` greedy (`sd_loop.py`)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        s, t = engine.spec, engine.target
        self.spec = sd_loop.SdSpec(
            s.sd_tokens, s.max_step_tokens, s.max_new_tokens, t.stop_ids, t.eos_ids, t.pad_id
        )

    def run(self, state: dict) -> dict:
        t, d = self.engine.target, self.engine.draft
        return sd_loop.speculate_tokens(t.graphdef, t.state, d.graphdef, d.state, state, self.spec)

    def solution(self, r: dict, row: int) -> Solution:
        tokens = r["tokens"][row, : int(r["n"][row])].tolist()
        return Solution(
            tokens,
            self.engine.split_steps(tokens),
            proposed=int(r["proposed"][row]),
            accepted=int(r["accepted"][row]),
            target_calls=int(r["passes"][row]),
        )


def _read(state: dict) -> dict:
    """Everything the host needs of the rows, in one transfer."""
    return jax.device_get({k: v for k, v in state.items() if k not in _DEVICE_ONLY})


_ONE_ROW = np.ones((1,), bool)


def solve_one(engine: Engine, inputs, max_len: int) -> Solution:
    """A single request as a batch of one row, its prefill used as the batch in place."""
    lanes = engine.lanes
    state = lanes.start(lanes.prefill(inputs, max_len), _ONE_ROW)
    return lanes.solution(_read(lanes.run(state)), 0)


@dataclasses.dataclass
class _InFlight:
    tag: Any
    started: float


class RowBatch:
    """`rows` requests in flight over the engine's mode (one that files `lanes`)."""

    def __init__(self, engine: Engine, rows: int):
        lanes = engine.lanes
        if lanes is None:
            raise ValueError(
                f"spec.mode={engine.spec.mode!r} runs as a host loop and answers one request at "
                "a time; batching needs a device-loop mode (`SpecConfig.runs_on_device`)"
            )
        self.engine, self.lanes, self.rows = engine, lanes, rows
        self.flight: list[_InFlight | None] = [None] * rows
        self.state: dict | None = None
        self.max_len = 0

    @property
    def free(self) -> int:
        return self.flight.count(None)

    @property
    def busy(self) -> bool:
        return self.free < self.rows

    def admit(self, ids: list[int], inputs, tag, started: float) -> None:
        """Prefills a request (`Engine.prompt`'s ids and inputs) into a free row; its latency
        counts from `started` (`time.perf_counter()`). Errors leave the batch as it was."""
        row = self.flight.index(None)
        need = self.engine.max_len(len(ids))
        max_len = max(need, self.max_len)
        sessions = self.lanes.prefill(inputs, max_len)
        if self.state is None:
            self.state = self.lanes.start(
                self.lanes.empty(self.rows, max_len), np.zeros((self.rows,), bool)
            )
        elif max_len > self.max_len:
            self.state = self.lanes.grow(self.state, max_len)
        self.max_len = max_len
        self.state = self.lanes.admit(self.state, row, sessions)
        self.flight[row] = _InFlight(tag, started)

    def run(self) -> list[tuple[Any, Solution]]:
        """Runs the loop until a row finishes; returns (tag, solution) of every finished row,
        whose rows are free again."""
        self.state = self.lanes.run(self.state)
        r = _read(self.state)
        now = time.perf_counter()
        finished = []
        for row in np.flatnonzero(r["active"] & r["done"]):
            flight, self.flight[row] = self.flight[row], None
            solution = self.lanes.solution(r, int(row))
            solution.latency_s = now - flight.started
            finished.append((flight.tag, solution))
        self.state["active"] = _release(self.state["active"], self.state["done"])
        return finished
