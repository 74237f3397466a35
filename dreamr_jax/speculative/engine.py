"""The engine: one target, one draft, and the pieces every decoding mode shares (DESIGN.md
section 2): prompts and sessions, draft windows, tree-shaped verification and CPN verdicts, commit,
the target taking over a step, rollback, and the records of the device loops. The
modes themselves are one module each under `modes/`, looked up by `spec.mode`.

A mode answers one request (images + question) at a time through `Engine.solve`; the modes
that run as one device loop (`target`, `draft`, greedy `sd`, `exact`, greedy `dreamr` with
`resume`) also answer many at once, each request in a row of its own (`batch.py`). Inside a
request the parallelism comes from batching too: CPN verifies the W drafted steps of a window
as W branches of one forward pass, and eager fallback / Lookahead generate the target's steps
for all W positions as one batched step loop. Device work is dispatched before the host reads
any verdict.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import numpy as np

from dreamr_jax.config.schema import DEFAULT_ALPHA, SpecConfig
from dreamr_jax.models.inputs import pad_vision, prepare_inputs
from dreamr_jax.models.processor import process_images
from dreamr_jax.models.sampling import Sampling
from dreamr_jax.speculative import modes
from dreamr_jax.speculative.cpn import cpn_verdicts
from dreamr_jax.speculative.records import Solution, StepRecord
from dreamr_jax.speculative.runner import ModelRunner, Session, chunk_width, take_branch, truncate
from dreamr_jax.speculative.verification import Verification

# Prompts are left-padded to a multiple of this, so few shapes are ever compiled; prefill is
# compute-bound, so padding a DigitMath prompt of 33-48 tokens to 64 cost a third of it.
BUCKET = 16


class PromptTooLongError(ValueError):
    """The prompt plus `spec.max_new_tokens` does not fit the target's positions."""


# The same keys as `jax.random.key(int)`, as one compiled program instead of eager ops.
_random_key = jax.jit(jax.random.key)


@jax.jit
def _mark(marks, i):
    """marks[:, i] `[batch, vocab]` with a traced i: one program for every i."""
    return marks[:, i]


class Engine:
    def __init__(self, target, draft, spec: SpecConfig, *, seed: int = 0, host_loop=False):
        """target, draft: `LoadedModel`s (draft may be None for mode `target`). `host_loop`:
        run `sd`, `exact` and `dreamr` as the host loop also where the device loop applies
        (greedy, `resume`): the reference the device loop is tested against, and its timing
        baseline."""
        if spec.alpha is None:  # no pair-specific alpha given: the paper's
            spec = dataclasses.replace(spec, alpha=DEFAULT_ALPHA)
        self.spec, self.seed, self.host_loop = spec, seed, host_loop
        self.builder = target.builder
        self.processor = target.processor
        delimiter = target.builder.prompt.step_delimiter
        self.target = ModelRunner.create(target.model, target.tokenizer, delimiter)
        self.draft = ModelRunner.create(draft.model, draft.tokenizer, delimiter) if draft else None
        if spec.mode != "target" and self.draft is None:
            raise ValueError(f"spec.mode={spec.mode!r} needs a draft model (draft.path)")
        self.mode = modes.get(spec.mode)
        self.sampling = Sampling(temperature=spec.temperature)
        self.eos = set(target.model.config.eos_token_ids)

    # ------------------------------------------------------------------------------ plumbing

    def decode(self, tokens) -> str:
        return self.builder.decode(tokens)

    def prompt(self, question: str, images) -> tuple[list[int], object]:
        """Prompt ids and the (padded) model inputs of a request."""
        return self.prompt_from_patches(question, *process_images(self.processor, images))

    def prompt_from_patches(self, question: str, pixel_values, grid) -> tuple[list[int], object]:
        """`prompt` of images the processor has already turned into patches `[patches, C*T*P*P]`
        and grids `[images, 3]` (serving runs the two apart, to say which one a record broke)."""
        ids = self.builder.prompt_ids(question, [g.tolist() for g in grid])
        limit = self.builder.model.text.max_position_embeddings
        if len(ids) + self.spec.max_new_tokens > limit:
            raise PromptTooLongError(
                f"prompt of {len(ids)} tokens + spec.max_new_tokens={self.spec.max_new_tokens} "
                f"exceeds the model's limit of {limit} positions"
            )
        width = -(-len(ids) // BUCKET) * BUCKET
        padded = np.full((1, width), self.builder.model.pad_token_id, np.int32)
        padded[0, width - len(ids) :] = ids
        mask = np.zeros((1, width), bool)
        mask[0, width - len(ids) :] = True
        inputs, _ = prepare_inputs(self.builder.model, padded, mask, pixel_values, grid)
        n = len(pixel_values)
        patches = max(64, 1 << (n - 1).bit_length())  # power of two: few vision shapes
        merge = self.builder.model.vision.spatial_merge_size
        inputs = dataclasses.replace(inputs, vision=pad_vision(inputs.vision, patches, merge))
        return ids, inputs

    def max_len(self, prompt_len: int) -> int:
        """Cache slots a request can need; attention reads every slot, so no more.

        A step begins only while the chain is below `max_new_tokens`, so committed plus drafted
        tokens stay below max_new_tokens + max_step_tokens, and a target step written in place
        of a drafted one (a fallback) starts where that step did. Chunk padding needs no room
        (the cache drops writes past its end). On top of the chain only what a mode writes
        after it: the judge suffixes of a verification pass (none for `exact`), sd's proposals,
        or the target's steps decoded side by side after a window (eager fallback, lookahead),
        which write over the suffixes."""
        s = self.spec
        need = -(-prompt_len // BUCKET) * BUCKET + s.max_new_tokens + s.max_step_tokens - 1
        need += max(self.mode.room(self), self.mode.branches(s) * s.max_step_tokens)
        return -(-need // 128) * 128

    @property
    def resumes(self) -> bool:
        """Whether a rejection leaves the rest of the target's step to the draft (`resume`;
        `exact` always)."""
        return self.mode.resumes(self.spec)

    @property
    def most_steps(self) -> int:
        """Steps a verification pass can hold: W, and with `resume` the end of a step the
        target began (it does not count towards W, so windows still cover W whole steps)."""
        return self.spec.window + self.resumes

    def key(self, step: int):
        return _random_key(np.int32((self.seed * 1_000_003 + step) % 2**31))

    def take(self, tokens, n, row: int = 0) -> list[int]:
        # Whole arrays to the host, sliced there: a device slice per length would be a new
        # small program for every step length.
        return np.asarray(tokens)[row, : int(np.asarray(n)[row])].tolist()

    # ---------------------------------------------------------------------------- a request

    def solve(self, question: str, images) -> Solution:
        started = time.perf_counter()
        ids, inputs = self.prompt(question, images)
        return self.answer(ids, inputs, started)

    def answer(self, ids: list[int], inputs, started: float) -> Solution:
        """The mode's solution of a prompt (`prompt`'s ids and inputs); its latency counts from
        `started`, a `time.perf_counter()` taken before the prompt was made."""
        solution = self.mode.run(self, inputs, self.max_len(len(ids)))
        solution.latency_s = time.perf_counter() - started
        return solution

    def warm_up(self, ids: list[int], inputs) -> None:
        """Compiles what a request shaped like this prompt (`prompt`'s ids and inputs) can run,
        so no later request pays for compilation: one full answer, then what that answer may not
        have reached: a verification pass of every chunk width a window can produce, the
        target's fallback step (and its steps side by side: eager, lookahead), and the draft
        taking a committed step of every padded length and dropping rejected steps."""
        self.answer(ids, inputs, time.perf_counter())
        if not self.mode.warms_host_loop or self.device_loop:
            return
        max_len = self.max_len(len(ids))
        score = self.spec.mode == "specreason"
        suffix = self.builder.score_suffix_ids if score else self.builder.judge_suffix_ids
        window = 1 if score else self.most_steps
        longest = chunk_width(window * (self.spec.max_step_tokens + len(suffix)))
        filler = self.builder.judge_suffix_ids[0]
        for width in sorted({chunk_width(n) for n in range(1, longest + 1)}):
            step = [filler] * max(1, width - len(suffix))
            t = self.target.start(inputs, max_len)
            self.cpn(self.verify(t, [step], suffix).verdict_logits)  # fetched: blocks
        # A fallback that starts from the verification's agreement: a cut, then one token.
        v = self.verify(self.target.start(inputs, max_len), [[filler] * 2], suffix)
        jax.block_until_ready(self.target.extend(v.cut(1), [[filler]], [[0]])[1].logits)
        cap = self.spec.max_step_tokens
        t = self.target.start(inputs, max_len)
        jax.block_until_ready(self.target.step(t, self.key(0), cap, self.sampling)[0])
        if branches := self.mode.branches(self.spec):
            v = self.verify(self.target.start(inputs, max_len), [[filler] * 2], suffix)
            tokens, n, b, logits = v.target_steps(
                self.target, [0] * branches, self.key(0), cap, self.sampling
            )
            jax.block_until_ready(take_branch(b, logits, 0, 1, cap).logits)
        width = 1
        while width < 2 * self.spec.max_step_tokens:
            d = self.draft.start(inputs, max_len)
            _, d = self.draft.extend(d, [[filler] * width], [[0]])
            jax.block_until_ready(truncate(d, 1, d.logits).cache.length)  # a rejected draft
            width *= 2
        for limit in sorted({window, window - self.resumes}):
            _, marks, _ = self.draft_window(
                self.draft.start(inputs, max_len), Solution([], []), limit
            )
            jax.block_until_ready(_mark(marks, np.int32(0)))  # where a rollback returns to

    def start(self, inputs, max_len: int) -> tuple[Session, Session]:
        """The target's and the draft's sessions after the prompt."""
        return self.target.start(inputs, max_len), self.draft.start(inputs, max_len)

    def done(self, tokens: list[int]) -> bool:
        return bool(tokens) and (tokens[-1] in self.eos or len(tokens) >= self.spec.max_new_tokens)

    def chain_end(self, tokens: list[int]) -> int | None:
        """How many of `tokens` the chain keeps if it ends among them, where the target alone
        ends it (`chain_loop.py`): at the first step end at or past `max_new_tokens`, or at
        EOS; None if it goes on."""
        stops, run = set(self.target.stop_ids) | self.eos, 0
        for i, token in enumerate(tokens):
            run += 1
            if token in stops or run >= self.spec.max_step_tokens:
                if token in self.eos or i + 1 >= self.spec.max_new_tokens:
                    return i + 1
                run = 0
        return None

    def open_step(self, tokens: list[int]) -> int:
        """Tokens of the chain's last step if it is not finished: since the last stop token,
        less the whole steps the cap cut there (as `generate_steps` cuts)."""
        ends = set(self.target.stop_ids) | self.eos
        run = next((i for i, token in enumerate(reversed(tokens)) if token in ends), len(tokens))
        return run % self.spec.max_step_tokens

    def commit(self, sol: Solution, step: list[int], author: str, **record) -> None:
        sol.tokens += step
        sol.steps.append(StepRecord(self.decode(step), author, step, **record))

    def draft_window(self, d: Session, sol: Solution, limit: int, in_step: int = 0):
        """Up to `limit` draft steps, in one device call, the first of which holds `in_step`
        committed tokens already (`generate_steps`). Returns (steps, marks `[1, limit + 1,
        vocab]`: the draft's logits before each step and after the last, session)."""
        return self.draft.read_steps(self.dispatch_window(d, len(sol.tokens), limit, in_step))

    def dispatch_window(self, d: Session, committed: int, limit: int, in_step: int = 0):
        """`draft_window` after `committed` chain tokens, dispatched and not waited for
        (`ModelRunner.read_steps` reads it)."""
        budget = self.spec.max_new_tokens - committed
        # Keyed by the position the window starts at, so sampled steps get fresh randomness.
        key = self.key(committed + 7919)
        # The peers keep their schedules: only exact's and dreamr's windows end early.
        confidence = self.spec.draft_confidence if self.mode.stops_on_doubt else None
        return self.draft.dispatch_steps(
            d,
            key,
            budget,
            limit,
            self.spec.max_step_tokens,
            self.sampling,
            confidence,
            in_step=in_step,
        )

    def verify(
        self, t: Session, steps: list[list[int]], suffix_ids=None, pending: int | None = None
    ) -> Verification:
        """Judge queries for every drafted step in one tree-shaped pass over the target's
        session (donated). `pending`: a committed token not yet in the target's cache (the
        last of a `resume` fallback), fed at the head of the chain; the first step's judge
        query sees it, and `starts` count it."""
        suffix = list(self.builder.judge_suffix_ids if suffix_ids is None else suffix_ids)
        slots = max(self.most_steps, len(steps))
        chain = steps if pending is None else [[pending, *steps[0]], *steps[1:]]
        after, verdict, greedy, ends, tree, start = self.target.verify_tree(t, chain, suffix, slots)
        starts = np.concatenate([[0 if pending is None else 1], ends])
        return Verification(verdict, greedy, starts, tree, start, after)

    @staticmethod
    def rows(indices, at_least: int) -> list[int]:
        """`indices` padded with copies of the first to `at_least` rows: batched target steps
        keep one shape (one compiled program) whatever the window held."""
        indices = list(indices)
        return indices + indices[:1] * (at_least - len(indices))

    def cpn(self, verdict_logits):
        """CPN verdicts on the host, all fields in one transfer: the caller reads them anyway."""
        return jax.device_get(
            cpn_verdicts(
                verdict_logits,
                self.builder.positive_ids,
                self.builder.negative_ids,
                self.spec.alpha,
                self.spec.format_floor,
            )
        )

    def resync_draft(self, d: Session, steps, marks, kept: int, new_step: list[int]) -> Session:
        """Draft cache back to the first `kept` drafted steps, then the committed target step."""
        drop = sum(len(s) for s in steps[kept:])
        d = truncate(d, drop, _mark(marks, np.int32(kept))) if drop else d
        if new_step and new_step[-1] not in self.eos:
            _, d = self.draft.extend(d, [new_step], [[0]])
        return d

    def undo_window(self, dispatched) -> Session:
        """The draft's session from before a window it drafted ahead (`dispatch_window`) and
        that is not used: the window's tokens dropped, the logits from before it."""
        steps, marks, d = self.draft.read_steps(dispatched)
        drop = sum(len(s) for s in steps)
        return truncate(d, drop, _mark(marks, np.int32(0))) if drop else d

    def is_own_step(self, v: Verification, steps, j: int) -> bool:
        """Whether drafted step j is word for word the step the target would write there
        (greedy decoding only)."""
        return self.sampling.greedy and v.agreement(steps, j) == len(steps[j])

    def target_step(
        self, sol: Solution, v: Verification, steps, kept: int, resume=False, in_step: int = 0
    ):
        """The target's own step after the first `kept` drafted steps (after `in_step` tokens of
        it already committed: the step a `resume` fallback left open), its session, and the
        step's last token if the session does not hold it yet (`resume`), else None.

        Greedy, most of it is read off the verification pass (`Verification.agreement`): its
        step starts with the longest prefix of the rejected draft step that agrees with its
        greedy choices, then its own token where they part, and only the rest is decoded, from
        the verification's cache. A wrong draft step usually parts from the target's partway
        through (`62 + 15 = 92 + 5`), so about half of it is read off. With `resume` it stops
        at the target's own token: the draft writes the rest of the step in the next window,
        which the target verifies like any drafted step, feeding that token (pending) first
        in the same pass.
        Sampling decodes the whole step."""
        key, cap = self.key(len(sol.tokens) + 1), self.spec.max_step_tokens
        if not self.sampling.greedy:
            tokens, n, _, t = self.target.step(v.at([kept]), key, cap, self.sampling)
            sol.target_calls += 1
            return self.take(tokens, n), t, None
        draft_step, start = steps[kept], int(v.starts[kept])
        agree = v.agreement(steps, kept)
        if agree == len(draft_step):
            return list(draft_step), v.at([kept + 1]), None
        own = [*draft_step[:agree], int(v.greedy_tokens[start + agree])]
        ends = self.target.stop_ids + self.target.eos_ids
        room = cap - in_step - len(own)  # tokens the step may still take
        if resume and own[-1] not in ends and room > 0:
            return own, v.cut(start + agree), own[-1]
        _, t = self.target.extend(v.cut(start + agree), [own[-1:]], [[0]])
        sol.target_calls += 1
        if own[-1] in ends or room <= 0:
            return own, t, None
        tokens, n, _, t = self.target.step(t, key, cap, self.sampling, limit=room)
        sol.target_calls += 1
        return own + self.take(tokens, n), t, None

    def target_takes_over(
        self, sol: Solution, v: Verification, d: Session, steps, marks, kept, in_step: int = 0
    ):
        """The target writes the step after the first `kept` drafted steps (`target_step`);
        it is committed and the draft resynchronised. Returns the target and draft sessions and
        the token pending for the target (`target_step`)."""
        new_step, t, pending = self.target_step(sol, v, steps, kept, self.resumes, in_step)
        self.commit(sol, new_step, "target")
        return t, self.resync_draft(d, steps, marks, kept, new_step), pending

    @functools.cached_property
    def lanes(self):
        """The mode's device loop over a batch of rows (`batch.py`); None for a host loop."""
        return self.mode.lanes(self) if self.mode.lanes else None

    @property
    def apart(self) -> bool:
        """Whether draft and target live on devices of their own (then no one program holds
        both, and `exact` and `dreamr` run the host loop)."""
        return self.draft is not None and self.draft.devices != self.target.devices

    @property
    def device_loop(self) -> bool:
        """Whether the mode runs as one device loop (`batch.py`; `SpecConfig.runs_on_device`):
        not where draft and target live on devices of their own, nor under `host_loop`."""
        return self.spec.runs_on_device(one_program=not (self.apart or self.host_loop))

    def device_records(self, r: dict, n: int) -> list[StepRecord]:
        """The host loop's step records, from what the device loop keeps of one row
        (`window_loop.speculate`): the committed units in order, each draft step that was not
        kept just before the target's tokens that replaced it, and a step the judge refused but
        the target would have written itself both as that refused draft step and as the
        target's."""
        dropped = {
            int(at): (r["dropped"][w, :length].tolist(), float(r["dropped_p"][w]))
            for w, (at, length) in enumerate(zip(r["dropped_at"], r["dropped_len"], strict=True))
            if length > 0
        }
        tokens, records, start = r["tokens"][:n].tolist(), [], 0
        for end in np.flatnonzero(r["unit_end"][:n]) + 1:
            if start in dropped:
                step, p = dropped[start]
                p = None if np.isnan(p) else p
                records.append(StepRecord(self.decode(step), "draft", step, p, False, False))
            unit, p = tokens[start:end], float(r["unit_p"][end - 1])
            text = self.decode(unit)
            if r["by_draft"][end - 1]:
                records.append(StepRecord(text, "draft", unit, p, True))
            else:
                if not np.isnan(p):
                    records.append(StepRecord(text, "draft", unit, p, False, False))
                records.append(StepRecord(text, "target", unit))
            start = end
        return records

    def split_steps(self, tokens: list[int], author: str = "target") -> list[StepRecord]:
        """A chain cut into steps where step loops cut it: after a stop token, or at the cap."""
        steps, current = [], []
        for token in tokens:
            current.append(token)
            ends = token in self.target.stop_ids or token in self.eos
            if ends or len(current) >= self.spec.max_step_tokens:
                steps.append(StepRecord(self.decode(current), author, current))
                current = []
        if current:
            steps.append(StepRecord(self.decode(current), author, current))
        return steps
