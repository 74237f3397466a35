"""Batch inference behind serve.py: JSONL in, JSONL out, resumable, robust to bad records.

Each output line is written and flushed as soon as its record is done, so a killed run loses at
most the line being written; a rerun with the same output finishes what is missing (output.py
reads the file back, whatever happened to it). Everything that reads, decodes, preprocesses,
tokenizes or answers one record runs inside one guard: any exception there becomes that record's
`error` line (naming the field or stage) and the batch goes on. Only failures of the process
itself stop the run (`ServeFailure`): the device or the host out of memory, a runtime error of
the device, or models that cannot answer the records of the warm-up.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
from tqdm import tqdm

from dreamr_jax.config.schema import ServeConfig
from dreamr_jax.data import answers, digitmath
from dreamr_jax.data.digitmath import problem_image
from dreamr_jax.models.processor import process_images
from dreamr_jax.provenance import provenance
from dreamr_jax.serve.output import (
    OutputLock,
    check_settings,
    recover_output,
    run_settings,
    summarize,
    write_summary,
)
from dreamr_jax.serve.records import (
    InputRecord,
    RecordError,
    answer_type_of,
    gold_answer,
    image_paths,
    load_image,
    question_of,
    read_records,
)
from dreamr_jax.speculative.batch import RowBatch
from dreamr_jax.speculative.engine import Engine
from dreamr_jax.speculative.records import Solution


class ServeFailure(RuntimeError):
    """The process itself failed; the run stops (what it answered stays in the output)."""


def is_process_failure(error: BaseException) -> bool:
    """Errors no record can cause on its own: out of memory, or the device runtime failing."""
    return isinstance(error, MemoryError | jax.errors.JaxRuntimeError)


@contextlib.contextmanager
def blame(where: str) -> Iterator[None]:
    """Turns any exception of the block into a `RecordError` that says where it happened;
    process failures pass through unchanged."""
    try:
        yield
    except RecordError:
        raise
    except Exception as e:
        if is_process_failure(e):
            raise
        raise RecordError(f"{where}: {type(e).__name__}: {e}") from e


def printable(text: str) -> str:
    """`text` with lone surrogates escaped, so that a log line cannot fail to print."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def solution_record(engine: Engine, rid: str, record: dict, sol: Solution, grading) -> dict:
    """A record's output line; `grading` `(answer type, number tolerance)`: how its prediction is
    read off the output and checked against its gold answer (data/answers.py)."""
    text = engine.decode(sol.tokens)
    kind, tolerance = grading
    gold = gold_answer(record)
    kind = answers.resolve_type(kind, gold) if gold is not None else kind
    kind = "text" if kind == "auto" else kind  # nothing to read the type off
    prediction = answers.extract(text, kind)
    out = {
        "id": rid,
        "output": text,
        "prediction": prediction,
        "answer_type": kind,
        "steps": [s.to_json() for s in sol.steps],
        "latency_s": round(sol.latency_s, 6),
        "new_tokens": len(sol.tokens),
        "proposed": sol.proposed,
        "accepted": sol.accepted,
        "target_calls": sol.target_calls,
        "format_misses": sol.format_misses,
    }
    if gold is not None:
        out["answer"] = gold
        out["correct"] = answers.is_correct(prediction, gold, kind, tolerance)
    return out


def warm_up(engine: Engine, n: int, rows: int = 1, prompts=None) -> None:
    """Compiles on `prompts` (`Engine.prompt`'s ids and inputs: the input's own first records, so
    their shapes are compiled), or on n DigitMath train problems, before anything is timed;
    through a batch of `rows` rows when there is more than one (its programs are the batch's)."""
    if prompts is None:
        problems = digitmath.generate_problems("train", n, 12345)
        prompts = [engine.prompt(p.question, [problem_image(p)]) for p in problems]
    if rows == 1:
        for ids, inputs in prompts:
            engine.warm_up(ids, inputs)
        return
    batch = RowBatch(engine, rows)
    for ids, inputs in prompts:
        batch.admit(ids, inputs, None, 0.0)
        if not batch.free:
            batch.run()
    while batch.busy:
        batch.run()


class Answerer:
    """Answers input records with one engine, one at a time or `batch_size` in flight, warmed up
    before the first record that reaches it (so a file of nothing but bad records compiles
    nothing)."""

    def __init__(self, cfg: ServeConfig, engine: Engine, folder: Path):
        self.cfg, self.engine, self.folder = cfg, engine, folder
        self.warmup_s = 0.0
        self._warm = cfg.warmup == 0
        self._todo: list[InputRecord] = []
        data = cfg.data
        # The embedded default input is DigitMath's: its own grader
        kind = "digitmath" if data.answer_type == "auto" and not data.input else data.answer_type
        self.grading = (kind, data.number_tolerance)

    def __call__(self, item: InputRecord) -> dict:
        """The output line of one input record: its answer, or its `error`."""
        if item.error is not None:
            return {"id": item.id, "error": item.error}
        with self._stop_on_process_failure(f"record {item.id!r} (line {item.line})"):
            try:
                return self._answer(item.id, item.record)
            except RecordError as e:
                return {"id": item.id, "error": str(e)}

    def lines(self, todo: list[InputRecord]) -> Iterator[tuple[InputRecord, dict]]:
        """Each record with its output line, in the order they finish: one at a time, or
        through a batch of `batch_size` rows refilled as rows finish (`RowBatch`)."""
        self._todo = todo  # the warm-up compiles on the first of them
        if self.cfg.batch_size == 1:
            for item in todo:
                yield item, self(item)
            return
        batch, queue, more = RowBatch(self.engine, self.cfg.batch_size), iter(todo), True
        while more or batch.busy:
            while more and batch.free:
                item = next(queue, None)
                more = item is not None
                line = self._admit(batch, item) if more else None
                if line is not None:
                    yield item, line
            if batch.busy:
                yield from self._run(batch)

    def _admit(self, batch: RowBatch, item: InputRecord) -> dict | None:
        """Puts a record in a free row of `batch`; its `error` line where it cannot go in."""
        if item.error is not None:
            return {"id": item.id, "error": item.error}
        with self._stop_on_process_failure(f"record {item.id!r} (line {item.line})"):
            try:
                ids, inputs, preparation_s = self.prepare(item.record)
                self._warm_up()
                started = time.perf_counter() - preparation_s
                with blame("answering"):
                    batch.admit(ids, inputs, item, started)
            except RecordError as e:
                return {"id": item.id, "error": str(e)}
        return None

    def _run(self, batch: RowBatch) -> Iterator[tuple[InputRecord, dict]]:
        """The batch run until a row finishes; the finished records with their lines."""
        in_flight = ", ".join(repr(row.tag.id) for row in batch.flight if row is not None)
        with self._stop_on_process_failure(f"the batch of records {in_flight}"):
            finished = batch.run()
        for item, solution in finished:
            try:
                yield item, self.finish(item.id, item.record, solution)
            except RecordError as e:
                yield item, {"id": item.id, "error": str(e)}

    @staticmethod
    @contextlib.contextmanager
    def _stop_on_process_failure(where: str) -> Iterator[None]:
        try:
            yield
        except Exception as e:
            if not is_process_failure(e):
                raise
            raise ServeFailure(f"{where}: {type(e).__name__}: {e}") from e

    def _answer(self, rid: str, record: dict) -> dict:
        ids, inputs, preparation_s = self.prepare(record)
        self._warm_up()
        # The latency counts the preparation and the answer, not a warm-up between them.
        started = time.perf_counter() - preparation_s
        with blame("answering"):
            solution = self.engine.answer(ids, inputs, started)
        return self.finish(rid, record, solution)

    def prepare(self, record: dict) -> tuple[list[int], object, float]:
        """A record's prompt ids and model inputs, and the seconds they took; a `RecordError`
        names the field or stage at fault."""
        data = self.cfg.data
        question = question_of(record)
        answer_type_of(record, self.grading[0])  # a bad type fails before any work
        gold_answer(record)
        paths = image_paths(record, data.max_images)
        with blame("field 'image'"):
            images = [load_image(self.folder, p, data.max_image_pixels) for p in paths]
            began = time.perf_counter()
            pixels, grid = process_images(self.engine.processor, images)
        with blame("prompt"):
            ids, inputs = self.engine.prompt_from_patches(question, pixels, grid)
        return ids, inputs, time.perf_counter() - began

    def finish(self, rid: str, record: dict, solution: Solution) -> dict:
        with blame("output"):
            grading = (answer_type_of(record, self.grading[0]), self.grading[1])
            return solution_record(self.engine, rid, record, solution, grading)

    def _warm_up(self) -> None:
        """Compiles on the first `warmup` records that can be answered (their own shapes: a
        DigitMath warm-up would leave a user's images and prompts to compile on the clock)."""
        if self._warm:
            return
        began = time.perf_counter()
        prompts, ids = [], []
        for item in self._todo:
            if len(prompts) == self.cfg.warmup:
                break
            if item.error is None:
                try:
                    prompts.append(self.prepare(item.record)[:2])
                    ids.append(item.id)
                except RecordError:
                    continue  # it gets its error line on its turn
        try:
            warm_up(self.engine, len(prompts), self.cfg.batch_size, prompts)
        except Exception as e:
            raise ServeFailure(
                f"warm-up failed: the models could not answer records {', '.join(map(repr, ids))} "
                f"({type(e).__name__}: {e})"
            ) from e
        self._warm = True
        self.warmup_s = time.perf_counter() - began


def serve(
    cfg: ServeConfig,
    input_path: str,
    make_engine: Callable[[], Engine],
    progress: bool = True,
) -> dict:
    """Answers every record of `input_path` not yet in `cfg.output`; returns the summary (also
    written to `<output>.summary.json`, even when the run stops on a `ServeFailure`).

    Holds the output's lock throughout, reads the output back (reporting the lines it moved
    out), refuses one made with other settings, and loads the models (`make_engine`) only if
    a record is left to answer."""
    settings = run_settings(cfg)
    with OutputLock(cfg.output):
        done = recover_output(cfg.output)
        for line in done.damaged:
            print(
                printable(f"{cfg.output}: moved to {cfg.output}.damaged, {line}"), file=sys.stderr
            )
        check_settings(done, settings, cfg.output, cfg.allow_mixed_settings)
        records = list(read_records(input_path))
        if cfg.data.limit:
            records = records[: cfg.data.limit]
        todo = [item for item in records if item.id not in done.records]
        answered = list(done.records.values())
        answer = None
        if todo:
            try:
                engine = make_engine()
            except Exception as e:
                raise ServeFailure(f"loading the models: {type(e).__name__}: {e}") from e
            answer = Answerer(cfg, engine, Path(input_path).resolve().parent)
        started, solved = time.perf_counter(), 0
        try:
            with open(cfg.output, "a", encoding="utf-8") as out:
                lines = answer.lines(todo) if answer else iter(())
                bar = dict(total=len(todo), desc=cfg.spec.mode, disable=not progress or None)
                for item, line in tqdm(lines, **bar):
                    solved += "error" not in line
                    if "error" in line:
                        tqdm.write(printable(f"record {item.id!r}: {line['error']}"), sys.stderr)
                    line["settings"] = settings
                    out.write(json.dumps(line) + "\n")
                    out.flush()
                    answered.append(line)
        finally:
            run_s = time.perf_counter() - started - (answer.warmup_s if answer else 0.0)
            summary = summarize(
                answered,
                run_time_s=run_s,
                # Problems answered per second of this run: with requests in flight together, a
                # sum of their latencies is no measure of speed.
                throughput=solved / run_s if solved else None,
                lines_moved=len(done.damaged),
                # What the records answer and what produced them (the report reads the input)
                input=str(Path(input_path).resolve()),
                provenance=provenance(),
            )
            write_summary(cfg.output, summary)
    return summary
