"""One engine, seven decoding modes (DESIGN.md section 2), over one target and one draft.

Every mode answers one request (images + question) at a time, so latencies are per problem; the
parallelism of a mode comes from batching inside it: CPN verifies the W drafted steps of a window
as W rows of one forward pass, and eager fallback / Lookahead generate the target's steps for all
W positions as one batched step loop. Device work is dispatched before the host reads any verdict.

Modes:
- `target`, `draft`: one model alone, step by step.
- `sd`: token-level speculative decoding (greedy: accept while the target's argmax agrees;
  sampling: Leviathan et al. acceptance min(1, p/q) with the residual distribution).
- `specreason`: draft a step, the target rates it 0-9 in one token, keep it if >= threshold, else
  the target writes the step.
- `lookahead`: draft W steps, the target writes its own step at all W+1 positions in one batched
  pass; accept while equal (after whitespace normalisation), else while the target's CPN judge
  accepts the draft step; the target's step replaces the first rejected one (or is a bonus step).
- `exact`: draft W steps, the target keeps the longest prefix of them that equals its own greedy
  tokens, then its own token where they part, and asks no judge: exactly the target's greedy
  chain (greedy only; one device loop, `window_loop.py`). A lossless baseline, not DREAM-R.
- `dreamr`: CPN + FPSR: draft W steps, verify all W with one batched CPN pass, commit up to the
  first rejection and the target's step there (computed after the rejection with `lazy`, or for
  every position alongside the checks with `eager`), roll both caches back, next window. Greedy,
  `resume` commits the target's step only up to its first token that differs from the rejected
  step's; the draft's next window starts by finishing that step. Greedy `resume` (the default)
  runs as one device loop (`window_loop.py`); the other fallbacks, and sampling, as a host loop
  with a device call per draft window and per verification. The judge is asked at every alpha:
  at alpha >= 1 it never accepts, so the output is the target's, at the judge's cost (the
  judge-free path is `exact`).
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from dreamr_jax.config.schema import DEFAULT_ALPHA, SpecConfig
from dreamr_jax.models.inputs import pad_vision, prepare_inputs
from dreamr_jax.models.processor import process_images
from dreamr_jax.models.sampling import Sampling, filter_logits
from dreamr_jax.spec.cpn import cpn_verdicts
from dreamr_jax.spec.runner import (
    ModelRunner,
    Session,
    chunk_width,
    rows_at,
    select_rows,
    truncate,
)
from dreamr_jax.spec.window_loop import LoopSpec, speculate

# Prompts are left-padded to a multiple of this, so few shapes are ever compiled; prefill is
# compute-bound, so padding a DigitMath prompt of 33-48 tokens to 64 cost a third of it.
BUCKET = 16


class PromptTooLongError(ValueError):
    """The prompt plus `spec.max_new_tokens` does not fit the target's positions."""


@dataclasses.dataclass
class StepRecord:
    """A step the engine wrote or considered. `committed` steps make up the output. With the
    `resume` fallback a step can come in two records: the target's part, up to its first token
    that differs from the rejected draft step, then the draft's continuation."""

    text: str
    author: str  # "draft" or "target"
    tokens: list[int]
    p: float | None = None  # CPN p (dreamr, lookahead) or score / 9 (specreason)
    accepted: bool | None = None  # for draft proposals
    committed: bool = True

    def to_json(self) -> dict:
        out = {"text": self.text, "author": self.author, "committed": self.committed}
        if self.p is not None:
            out["p"] = round(float(self.p), 6)
        if self.accepted is not None:
            out["accepted"] = bool(self.accepted)
        return out


@dataclasses.dataclass
class Solution:
    tokens: list[int]
    steps: list[StepRecord]
    proposed: int = 0  # draft steps (tokens for sd) put to the target
    accepted: int = 0
    target_calls: int = 0  # target forward launches (verification passes, step loops)
    format_misses: int = 0  # CPN verdicts below the format floor
    latency_s: float = 0.0


@functools.partial(jax.jit, static_argnums=2)
def sd_target_view(first, logits, sampling: Sampling):
    """The target's view of an sd proposal, in one program: its argmax `[rows]` and, when
    sampling, its distribution `[rows, vocab]` before each proposed token and after the last.
    logits: `[1, size, vocab]` at every chunk position; first: `[1, vocab]`, the logits before
    the chunk when it starts with the proposal, or None when it starts with the pending token
    (whose own logits were read the round before)."""
    table = logits[0] if first is None else jnp.concatenate([first, logits[0]])
    probs = None
    if not sampling.greedy:
        probs = jax.nn.softmax(filter_logits(table, sampling), axis=-1)
    return jnp.argmax(table, axis=-1), probs


# The same keys as `jax.random.key(int)`, as one compiled program instead of eager ops.
_random_key = jax.jit(jax.random.key)


@jax.jit
def _mark(marks, i):
    """marks[:, i] `[batch, vocab]` with a traced i: one program for every i."""
    return marks[:, i]


def sd_accept(proposal, preds, probs, draft_log_probs, rng) -> tuple[int, int]:
    """How many proposed tokens the target keeps, and the token it adds after them.

    preds, probs: the target's argmax `[>= k + 1]` and, when sampling (else None), its
    distribution `[>= k + 1, vocab]` before each proposed token and after the last
    (`sd_target_view`); draft_log_probs: `[1, >= k, vocab]`, the draft's distributions.
    Greedy: keep while the argmax agrees, then the argmax. Sampling (Leviathan et al.): keep
    token x with probability min(1, p(x) / q(x)), else draw from max(p - q, 0) renormalised; the
    emitted tokens are then distributed exactly as the target's own samples.
    """
    if probs is None:
        preds = np.asarray(preds)
        kept = 0
        while kept < len(proposal) and proposal[kept] == preds[kept]:
            kept += 1
        return kept, int(preds[kept])
    probs = np.asarray(probs, np.float64)
    q = np.exp(np.asarray(draft_log_probs, np.float64)[0])
    for i, token in enumerate(proposal):
        if rng.random() < min(1.0, probs[i, token] / max(q[i, token], 1e-20)):
            continue
        residual = np.maximum(probs[i] - q[i], 0)
        residual = residual / residual.sum() if residual.sum() > 0 else probs[i] / probs[i].sum()
        return i, int(rng.choice(len(residual), p=residual))
    last = probs[len(proposal)]
    return len(proposal), int(rng.choice(len(last), p=last / last.sum()))


@dataclasses.dataclass
class Verification:
    """One tree-shaped verification pass over k drafted steps (`Engine._verify`).

    verdict_logits: `[max(W, k), vocab]` last-position logits of each judge query (rows past k
    are padding). greedy: `[width]`, the target's greedy token before each chunk token.
    starts: `[k + 1]`, where each step starts in the chunk (after a pending token,
    `Engine._verify`), then where the chain ends.
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


class Engine:
    def __init__(self, target, draft, spec: SpecConfig, *, seed: int = 0, host_loop=False):
        """target, draft: `LoadedModel`s (draft may be None for mode `target`). `host_loop`:
        run `dreamr` as the host loop also where the device loop applies (greedy, `resume`):
        the reference the device loop is tested against, and its timing baseline."""
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
        after it: the judge suffixes of a verification pass (none for `exact`), lookahead's
        bonus step after the whole window, sd's proposals."""
        s = self.spec
        need = -(-prompt_len // BUCKET) * BUCKET + s.max_new_tokens + s.max_step_tokens - 1
        if s.mode == "specreason":
            need += len(self.builder.score_suffix_ids)
        elif s.mode == "lookahead":
            need += s.window * len(self.builder.judge_suffix_ids) + s.max_step_tokens
        elif s.mode == "dreamr":
            need += self._most_steps * len(self.builder.judge_suffix_ids)
        elif s.mode == "sd":
            need += max(0, s.sd_tokens + 1 - s.max_step_tokens)
        return -(-need // 128) * 128

    @property
    def _resumes(self) -> bool:
        """Whether a rejection leaves the rest of the target's step to the draft (`resume`)."""
        return self.spec.mode == "dreamr" and self.spec.fallback == "resume"

    @property
    def _most_steps(self) -> int:
        """Steps a verification pass can hold: W, and with `resume` the end of a step the
        target began (it does not count towards W, so windows still cover W whole steps)."""
        return self.spec.window + self._resumes

    def _key(self, step: int):
        return _random_key(np.int32((self.seed * 1_000_003 + step) % 2**31))

    def _take(self, tokens, n, row: int = 0) -> list[int]:
        # Whole arrays to the host, sliced there: a device slice per length would be a new
        # small program for every step length.
        return np.asarray(tokens)[row, : int(np.asarray(n)[row])].tolist()

    # -------------------------------------------------------------------------------- modes

    def solve(self, question: str, images) -> Solution:
        started = time.perf_counter()
        ids, inputs = self.prompt(question, images)
        return self.answer(ids, inputs, started)

    def answer(self, ids: list[int], inputs, started: float) -> Solution:
        """The mode's solution of a prompt (`prompt`'s ids and inputs); its latency counts from
        `started`, a `time.perf_counter()` taken before the prompt was made."""
        max_len = self.max_len(len(ids))
        mode = self.spec.mode
        if mode in ("target", "draft"):
            runner = self.target if mode == "target" else self.draft
            solution = self._autoregressive(runner, mode, inputs, max_len)
        else:
            t = self.target.start(inputs, max_len)
            d = self.draft.start(inputs, max_len)
            solution = getattr(self, f"_{mode}")(t, d)
        solution.latency_s = time.perf_counter() - started
        return solution

    def warm_up(self, question: str, images) -> None:
        """Compiles what a request shaped like this one can run, so no later request pays for
        compilation: one full solve, then what that solve may not have reached: a verification
        pass of every chunk width a window can produce, the target's fallback step (one row,
        or W rows for eager), and the draft taking a committed step of every padded length and
        dropping rejected steps."""
        self.solve(question, images)
        if self.spec.mode not in ("dreamr", "lookahead", "specreason") or self._device_loop:
            return
        ids, inputs = self.prompt(question, images)
        max_len = self.max_len(len(ids))
        score = self.spec.mode == "specreason"
        suffix = self.builder.score_suffix_ids if score else self.builder.judge_suffix_ids
        window = 1 if score else self._most_steps
        longest = chunk_width(window * (self.spec.max_step_tokens + len(suffix)))
        filler = self.builder.judge_suffix_ids[0]
        for width in sorted({chunk_width(n) for n in range(1, longest + 1)}):
            step = [filler] * max(1, width - len(suffix))
            t = self.target.start(inputs, max_len)
            self._cpn(self._verify(t, [step], suffix).verdict_logits)  # fetched: blocks
        # A fallback that starts from the verification's agreement: a cut, then one token.
        v = self._verify(self.target.start(inputs, max_len), [[filler] * 2], suffix)
        jax.block_until_ready(self.target.extend(v.cut(1), [[filler]], [[0]])[1].logits)
        rows = [[0], [0] * self.spec.window] if self.spec.fallback == "eager" else [[0]]
        for batch in rows:
            t = select_rows(self.target.start(inputs, max_len), batch)
            jax.block_until_ready(
                self.target.step(t, self._key(0), self.spec.max_step_tokens, self.sampling)[0]
            )
        width = 1
        while width < 2 * self.spec.max_step_tokens:
            d = self.draft.start(inputs, max_len)
            _, d = self.draft.extend(d, [[filler] * width], [[0]])
            jax.block_until_ready(truncate(d, 1, d.logits).cache.length)  # a rejected draft
            width *= 2
        for limit in sorted({window, window - self._resumes}):
            _, marks, _ = self._draft_window(
                self.draft.start(inputs, max_len), Solution([], []), limit
            )
            jax.block_until_ready(_mark(marks, np.int32(0)))  # where a rollback returns to

    def _done(self, tokens: list[int]) -> bool:
        return bool(tokens) and (tokens[-1] in self.eos or len(tokens) >= self.spec.max_new_tokens)

    def _open_step(self, tokens: list[int]) -> int:
        """Tokens of the chain's last step if it is not finished: since the last stop token,
        less the whole steps the cap cut there (as `generate_steps` cuts)."""
        ends = set(self.target.stop_ids) | self.eos
        run = next((i for i, token in enumerate(reversed(tokens)) if token in ends), len(tokens))
        return run % self.spec.max_step_tokens

    def _autoregressive(self, runner: ModelRunner, author: str, inputs, max_len) -> Solution:
        """The whole chain in one device loop (`generate_steps` with a window as long as the
        budget), cut into steps as the other modes cut theirs. Step by step, with a host round
        trip after each, the target alone was ~7% slower: the baseline every speedup is
        measured against must not carry that."""
        session = runner.start(inputs, max_len)
        budget = self.spec.max_new_tokens  # steps have at least one token: at most this many
        steps, _, _ = runner.steps(
            session,
            self._key(0),
            budget,
            budget,
            self.spec.max_step_tokens,
            self.sampling,
            keep_marks=False,  # nothing to roll back to
        )
        sol = Solution([], [], target_calls=int(author == "target"))
        for step in steps:
            self._commit(sol, step, author)
        return sol

    def _commit(self, sol: Solution, step: list[int], author: str, **record) -> None:
        sol.tokens += step
        sol.steps.append(StepRecord(self.decode(step), author, step, **record))

    def _draft_window(self, d: Session, sol: Solution, limit: int, in_step: int = 0):
        """Up to `limit` draft steps, in one device call, the first of which holds `in_step`
        committed tokens already (`generate_steps`). Returns (steps, marks `[1, limit + 1,
        vocab]`: the draft's logits before each step and after the last, session)."""
        budget = self.spec.max_new_tokens - len(sol.tokens)
        # Keyed by the position the window starts at, so sampled steps get fresh randomness.
        key = self._key(len(sol.tokens) + 7919)
        # Only dreamr's windows end early on a doubtful step: the peers keep their schedules.
        confidence = self.spec.draft_confidence if self.spec.mode == "dreamr" else None
        return self.draft.steps(
            d,
            key,
            budget,
            limit,
            self.spec.max_step_tokens,
            self.sampling,
            confidence,
            in_step=in_step,
        )

    def _verify(
        self, t: Session, steps: list[list[int]], suffix_ids=None, pending: int | None = None
    ) -> Verification:
        """Judge queries for every drafted step in one tree-shaped pass over the target's
        session (donated). `pending`: a committed token not yet in the target's cache (the
        last of a `resume` fallback), fed at the head of the chain; the first step's judge
        query sees it, and `starts` count it."""
        suffix = list(self.builder.judge_suffix_ids if suffix_ids is None else suffix_ids)
        slots = max(self._most_steps, len(steps))
        chain = steps if pending is None else [[pending, *steps[0]], *steps[1:]]
        after, verdict, greedy, ends, tree, start = self.target.verify_tree(t, chain, suffix, slots)
        starts = np.concatenate([[0 if pending is None else 1], ends])
        return Verification(verdict, greedy, starts, tree, start, after)

    @staticmethod
    def _rows(indices, at_least: int) -> list[int]:
        """`indices` padded with copies of the first to `at_least` rows: batched target steps
        keep one shape (one compiled program) whatever the window held."""
        indices = list(indices)
        return indices + indices[:1] * (at_least - len(indices))

    def _cpn(self, verdict_logits):
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

    def _resync_draft(self, d: Session, steps, marks, kept: int, new_step: list[int]) -> Session:
        """Draft cache back to the first `kept` drafted steps, then the committed target step."""
        drop = sum(len(s) for s in steps[kept:])
        d = truncate(d, drop, _mark(marks, np.int32(kept))) if drop else d
        if new_step and new_step[-1] not in self.eos:
            _, d = self.draft.extend(d, [new_step], [[0]])
        return d

    def _is_own_step(self, v: Verification, steps, j: int) -> bool:
        """Whether drafted step j is word for word the step the target would write there
        (greedy decoding only)."""
        return self.sampling.greedy and v.agreement(steps, j) == len(steps[j])

    def _target_step(
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
        key, cap = self._key(len(sol.tokens) + 1), self.spec.max_step_tokens
        if not self.sampling.greedy:
            tokens, n, _, _, t = self.target.step(v.at([kept]), key, cap, self.sampling)
            sol.target_calls += 1
            return self._take(tokens, n), t, None
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
        tokens, n, _, _, t = self.target.step(t, key, cap, self.sampling, limit=room)
        sol.target_calls += 1
        return own + self._take(tokens, n), t, None

    def _target_takes_over(
        self, sol: Solution, v: Verification, d: Session, steps, marks, kept, in_step: int = 0
    ):
        """The target writes the step after the first `kept` drafted steps (`_target_step`);
        it is committed and the draft resynchronised. Returns the target and draft sessions and
        the token pending for the target (`_target_step`)."""
        new_step, t, pending = self._target_step(sol, v, steps, kept, self._resumes, in_step)
        self._commit(sol, new_step, "target")
        return t, self._resync_draft(d, steps, marks, kept, new_step), pending

    @property
    def _device_loop(self) -> bool:
        """Whether the mode runs as one device loop (`window_loop.speculate`): `exact`, and
        `dreamr` greedy with the `resume` fallback (unless `host_loop`)."""
        s = self.spec
        if s.mode == "exact":
            return True
        greedy_resume = self._resumes and self.sampling.greedy
        return s.mode == "dreamr" and greedy_resume and not self.host_loop

    def _exact(self, t: Session, d: Session) -> Solution:
        return self._speculate(t, d, judged=False)

    def _speculate(self, t: Session, d: Session, judged: bool) -> Solution:
        """The whole chain in one device call (`window_loop.speculate`), with the judge
        (`dreamr`) or without (`exact`)."""
        s, b = self.spec, self.builder
        judge = (b.judge_suffix_ids, b.positive_ids, b.negative_ids) if judged else ()
        shape = LoopSpec(
            s.window,
            s.max_step_tokens,
            s.max_new_tokens,
            self.target.stop_ids,
            self.target.eos_ids,
            self.target.pad_id,
            *judge,
        )
        results = speculate(
            self.target.graphdef,
            self.target.state,
            self.draft.graphdef,
            self.draft.state,
            t.cache,
            d.cache,
            t.logits,
            d.logits,
            shape,
            np.float32(s.draft_confidence),
            np.float32(s.alpha),
            np.float32(s.format_floor),
        )
        r = jax.device_get(results)  # one host read for the whole chain
        n = int(r["n"])
        return Solution(
            r["tokens"][:n].tolist(),
            self._records(r, n),
            proposed=int(r["proposed"]),
            accepted=int(r["accepted"]),
            target_calls=int(r["passes"]),
            format_misses=int(r["format_misses"]),
        )

    def _records(self, r: dict, n: int) -> list[StepRecord]:
        """The host loop's step records, from what the device loop keeps (`speculate`): the
        committed units in order, each draft step that was not kept just before the target's
        tokens that replaced it, and a step the judge refused but the target would have written
        itself both as that refused draft step and as the target's."""
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

    def _dreamr(self, t: Session, d: Session) -> Solution:
        if self._device_loop:
            return self._speculate(t, d, judged=True)
        sol = Solution([], [])
        eager = self.spec.fallback == "eager"
        pending = None  # the last token of a `resume` fallback, not yet in the target's cache
        # A pending token leaves its step open: the chain goes on to that step's end.
        while pending is not None or not self._done(sol.tokens):
            open_step = self._open_step(sol.tokens) if pending is not None else 0
            limit = self.spec.window + (open_step > 0)
            steps, marks, d = self._draft_window(d, sol, limit, open_step)
            k = len(steps)
            v, pending = self._verify(t, steps, pending=pending), None
            sol.target_calls += 1
            if eager:  # the target's step at every position, dispatched before any verdict
                # (always W rows, so one program serves every window)
                fallback = self.target.step(
                    v.at(self._rows(range(k), self.spec.window)),
                    self._key(len(sol.tokens) + 1),
                    self.spec.max_step_tokens,
                    self.sampling,
                )
                sol.target_calls += 1
            verdicts = self._cpn(v.verdict_logits)
            ok, p = verdicts.accept[:k], verdicts.p[:k].tolist()
            sol.format_misses += int(np.sum(~verdicts.format_ok[:k]))
            sol.proposed += k
            kept = 0
            while kept < k:
                step = steps[kept]
                if ok[kept]:
                    sol.accepted += 1
                    self._commit(sol, step, "draft", p=p[kept], accepted=True)
                else:
                    text = self.decode(step)
                    sol.steps.append(StepRecord(text, "draft", step, p[kept], False, False))
                    # A rejected step that is word for word the target's own step there is
                    # what the fallback would commit; the later steps were drafted and judged
                    # after exactly it, so the window goes on.
                    if not self._is_own_step(v, steps, kept):
                        break
                    self._commit(sol, step, "target")
                kept += 1
            if kept == k:
                t = v.at([k])
                continue
            if not eager:
                in_step = open_step if kept == 0 else 0
                t, d, pending = self._target_takes_over(sol, v, d, steps, marks, kept, in_step)
                continue
            tokens, n, _, _, batch = fallback
            new_step = self._take(tokens, n, kept)
            t = select_rows(batch, [kept])
            self._commit(sol, new_step, "target")
            d = self._resync_draft(d, steps, marks, kept, new_step)
        return sol

    def _specreason(self, t: Session, d: Session) -> Solution:
        sol = Solution([], [])
        score_ids = np.asarray(self.builder.score_ids)
        while not self._done(sol.tokens):
            steps, marks, d = self._draft_window(d, sol, 1)
            if not steps:
                break
            step = steps[0]
            v = self._verify(t, steps, self.builder.score_suffix_ids)
            sol.target_calls += 1
            # (Read whole: indexing on the device would run two small programs per step.)
            score = int(np.argmax(np.asarray(v.verdict_logits)[0, score_ids]))
            sol.proposed += 1
            if score >= self.spec.score_threshold:
                sol.accepted += 1
                self._commit(sol, step, "draft", p=score / 9, accepted=True)
                t = v.at([1])
                continue
            sol.steps.append(StepRecord(self.decode(step), "draft", step, score / 9, False, False))
            t, d, _ = self._target_takes_over(sol, v, d, steps, marks, 0)
        return sol

    def _lookahead(self, t: Session, d: Session) -> Solution:
        sol = Solution([], [])
        while not self._done(sol.tokens):
            steps, marks, d = self._draft_window(d, sol, self.spec.window)
            if not steps:
                break
            k = len(steps)
            # One pass over the drafted chain (with the judge queries, used on a mismatch), then
            # the target writes its own step after every prefix of it, as k + 1 batched rows.
            v = self._verify(t, steps)
            tokens, n, _, _, batch = self.target.step(
                v.at(self._rows(range(k + 1), self.spec.window + 1)),
                self._key(len(sol.tokens) + 1),
                self.spec.max_step_tokens,
                self.sampling,
            )
            sol.target_calls += 2
            target_steps = [self._take(tokens, n, i) for i in range(k + 1)]
            verdicts = None
            kept = 0
            for i, step in enumerate(steps):
                same = self.decode(step).strip() == self.decode(target_steps[i]).strip()
                p = None
                if not same:  # not the same words: the target judges whether the step holds
                    verdicts = verdicts or self._cpn(v.verdict_logits)
                    p = float(verdicts.p[i])
                    same = bool(verdicts.accept[i])
                sol.proposed += 1
                if not same:
                    sol.steps.append(StepRecord(self.decode(step), "draft", step, p, False, False))
                    break
                kept += 1
                sol.accepted += 1
                self._commit(sol, step, "draft", p=p, accepted=True)
                if step[-1] in self.eos:
                    break
            if sol.tokens and sol.tokens[-1] in self.eos:
                break
            new_step = target_steps[kept]
            self._commit(sol, new_step, "target")
            t = select_rows(batch, [kept])
            d = self._resync_draft(d, steps, marks, kept, new_step)
        return sol

    def _sd(self, t: Session, d: Session) -> Solution:
        sol = Solution([], [])
        rng = np.random.default_rng(self.seed)
        pending = None  # the target's own token of the last round, in neither cache yet
        while not self._done(sol.tokens):
            if pending is not None:
                _, d = self.draft.extend(d, [[pending]], [[0]])
            tokens, n, _, draft_dists, d = self.draft.step(
                d,
                self._key(len(sol.tokens)),
                self.spec.sd_tokens,
                self.sampling,
                stop=False,
                keep_dists=True,
            )
            proposal = self._take(tokens, n)
            k = len(proposal)
            # The pending token and the proposal go to the target in one chunk; its logits
            # before each proposed token and after the last are `[k + 1, vocab]`. Gathers are
            # padded to sd_tokens + 1 and chunks to its width: one compiled shape per kind.
            size = self.spec.sd_tokens + 1
            first = t.logits if pending is None else None
            chunk = proposal if pending is None else [pending, *proposal]
            logits, t = self.target.extend(t, [chunk], [list(range(size))], size)
            preds, probs = sd_target_view(first, logits, self.sampling)
            sol.target_calls += 1
            sol.proposed += k
            kept, extra = sd_accept(proposal, preds, probs, draft_dists, rng)
            sol.accepted += kept
            committed = proposal[:kept]
            if kept < k or proposal[-1] not in self.eos:
                committed = committed + [extra]
            sol.tokens += committed
            # Both caches back to the accepted tokens; `extra` goes in with the next round.
            if kept < k:
                t = truncate(t, k - kept, t.logits)
                d = truncate(d, k - kept, draft_dists[:, kept])
            pending = extra
        sol.tokens = sol.tokens[: self.spec.max_new_tokens]
        sol.steps = self._split_steps(sol.tokens)
        return sol

    def _split_steps(self, tokens: list[int]) -> list[StepRecord]:
        """A chain cut into steps where step loops cut it: after a stop token, or at the cap."""
        steps, current = [], []
        for token in tokens:
            current.append(token)
            ends = token in self.target.stop_ids or token in self.eos
            if ends or len(current) >= self.spec.max_step_tokens:
                steps.append(StepRecord(self.decode(current), "target", current))
                current = []
        if current:
            steps.append(StepRecord(self.decode(current), "target", current))
        return steps
