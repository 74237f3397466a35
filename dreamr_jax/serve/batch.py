"""Batch inference behind serve.py: JSONL in, JSONL out, resumable, robust to bad records.

Each output line is written and flushed as soon as its record is done, so a killed run loses at
most the line being written; a rerun with the same output finishes what is missing (output.py
reads the file back, whatever happened to it). Everything that reads, decodes, preprocesses,
tokenizes or answers one record runs inside one guard: any exception there becomes that record's
`error` line (naming the field or stage) and the batch goes on. Only failures of the process
itself stop the run (`ServeFailure`): the device or the host out of memory, a runtime error of
the device, or models that cannot answer a known-good problem in the warm-up.
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
from dreamr_jax.data import digitmath
from dreamr_jax.data.sft import problem_image
from dreamr_jax.models.processor import process_images
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
    image_paths,
    load_image,
    question_of,
    read_records,
)
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


def solution_record(engine: Engine, rid: str, record: dict, sol: Solution) -> dict:
    text = engine.decode(sol.tokens)
    prediction = digitmath.extract_answer(text)
    out = {
        "id": rid,
        "output": text,
        "prediction": prediction,
        "steps": [s.to_json() for s in sol.steps],
        "latency_s": round(sol.latency_s, 6),
        "new_tokens": len(sol.tokens),
        "proposed": sol.proposed,
        "accepted": sol.accepted,
        "target_calls": sol.target_calls,
        "format_misses": sol.format_misses,
    }
    if record.get("answer") is not None:
        out["answer"] = str(record["answer"])
        out["correct"] = digitmath.is_correct(prediction, out["answer"])
    return out


def warm_up(engine: Engine, n: int) -> None:
    """Compiles on n DigitMath train problems before anything is timed."""
    for problem in digitmath.generate_problems("train", n, 12345):
        engine.warm_up(problem.question, [problem_image(problem)])


class Answerer:
    """Answers input records one at a time with one engine, warmed up before the first record
    that reaches it (so a file of nothing but bad records compiles nothing)."""

    def __init__(self, cfg: ServeConfig, engine: Engine, folder: Path):
        self.cfg, self.engine, self.folder = cfg, engine, folder
        self.warmup_s = 0.0
        self._warm = cfg.warmup == 0

    def __call__(self, item: InputRecord) -> dict:
        """The output line of one input record: its answer, or its `error`."""
        if item.error is not None:
            return {"id": item.id, "error": item.error}
        try:
            return self._answer(item.id, item.record)
        except RecordError as e:
            return {"id": item.id, "error": str(e)}
        except Exception as e:
            if not is_process_failure(e):
                raise
            raise ServeFailure(
                f"record {item.id!r} (line {item.line}): {type(e).__name__}: {e}"
            ) from e

    def _answer(self, rid: str, record: dict) -> dict:
        data = self.cfg.data
        question = question_of(record)
        paths = image_paths(record, data.max_images)
        with blame("field 'image'"):
            images = [load_image(self.folder, p, data.max_image_pixels) for p in paths]
            began = time.perf_counter()
            pixels, grid = process_images(self.engine.processor, images)
        with blame("prompt"):
            ids, inputs = self.engine.prompt_from_patches(question, pixels, grid)
        preparation_s = time.perf_counter() - began
        self._warm_up()
        # The latency counts the preparation and the answer, not a warm-up between them.
        started = time.perf_counter() - preparation_s
        with blame("answering"):
            solution = self.engine.answer(ids, inputs, started)
        with blame("output"):
            return solution_record(self.engine, rid, record, solution)

    def _warm_up(self) -> None:
        if self._warm:
            return
        began = time.perf_counter()
        try:
            warm_up(self.engine, self.cfg.warmup)
        except Exception as e:
            raise ServeFailure(
                f"warm-up failed: the models could not answer a DigitMath problem "
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
        started = time.perf_counter()
        try:
            with open(cfg.output, "a", encoding="utf-8") as out:
                for item in tqdm(todo, desc=cfg.spec.mode, disable=not progress or None):
                    line = answer(item)
                    if "error" in line:
                        tqdm.write(printable(f"record {item.id!r}: {line['error']}"), sys.stderr)
                    line["settings"] = settings
                    out.write(json.dumps(line) + "\n")
                    out.flush()
                    answered.append(line)
        finally:
            run_s = time.perf_counter() - started - (answer.warmup_s if answer else 0.0)
            summary = summarize(answered, run_time_s=run_s, lines_moved=len(done.damaged))
            write_summary(cfg.output, summary)
    return summary
