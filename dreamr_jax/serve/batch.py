"""Batch inference behind serve.py: JSONL in, JSONL out, resumable, robust to bad records.

Input records: `{"id", "image": path | [paths], "question", "answer"?}` (paths relative to the
input file's folder). Each output line is written and flushed as soon as its record is done, so a
killed run loses at most the line being written; a rerun with the same output drops a torn last
line, skips every id already there and appends the rest. A record that cannot be processed
(malformed JSON, a missing field, a missing or unreadable image, a prompt too long for the model)
gets an output line with `error` and the batch goes on.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from dreamr_jax.config.schema import ServeConfig
from dreamr_jax.data import digitmath
from dreamr_jax.data.sft import problem_image
from dreamr_jax.spec.engine import Engine, PromptTooLongError, Solution


class RecordError(ValueError):
    """A problem with one input record; becomes that record's `error`."""


def read_records(path: str) -> Iterator[tuple[str, dict | None, str | None]]:
    """(id, record, error) per non-empty line; unparsable lines get id `line-<n>`."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                yield f"line-{number}", None, f"line {number}: malformed JSON ({e.msg})"
                continue
            if not isinstance(record, dict):
                yield f"line-{number}", None, f"line {number}: a record must be a JSON object"
                continue
            rid = record.get("id")
            if not isinstance(rid, str) or not rid:
                yield f"line-{number}", None, f"line {number}: missing or non-string field 'id'"
                continue
            yield rid, record, None


def load_images(record: dict, folder: Path) -> list[Image.Image]:
    paths = record.get("image")
    if paths is None:
        raise RecordError("missing field 'image'")
    paths = [paths] if isinstance(paths, str) else paths
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
        raise RecordError("field 'image' must be a path or a non-empty list of paths")
    images = []
    for p in paths:
        full = folder / p
        try:
            with Image.open(full) as image:
                images.append(image.convert("RGB"))
        except FileNotFoundError:
            raise RecordError(f"image not found: {p}") from None
        except OSError as e:
            raise RecordError(f"unreadable image {p}: {e}") from None
    return images


def finished_ids(path: str) -> set[str]:
    """Ids already in the output; a torn last line (killed mid-write) is cut off."""
    if not os.path.exists(path):
        return set()
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    done = set()
    for line in data[:end].splitlines():
        try:
            done.add(json.loads(line)["id"])
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return done


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
        out["correct"] = digitmath.is_correct(prediction, str(record["answer"]))
    return out


def process(engine: Engine, rid: str, record: dict, folder: Path) -> dict:
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        raise RecordError("missing or empty field 'question'")
    images = load_images(record, folder)
    try:
        solution = engine.solve(question, images)
    except PromptTooLongError as e:
        raise RecordError(str(e)) from None
    return solution_record(engine, rid, record, solution)


def warm_up(engine: Engine, n: int) -> None:
    """Compiles on n DigitMath train problems before anything is timed."""
    for problem in digitmath.generate_problems("train", n, 12345):
        engine.warm_up(problem.question, [problem_image(problem)])


def serve(cfg: ServeConfig, engine: Engine, input_path: str, progress: bool = True) -> dict:
    """Answers every record of `input_path` not yet in `cfg.output`; returns the summary."""
    folder = Path(input_path).resolve().parent
    os.makedirs(os.path.dirname(os.path.abspath(cfg.output)), exist_ok=True)
    done = finished_ids(cfg.output)
    records = list(read_records(input_path))
    if cfg.data.limit:
        records = records[: cfg.data.limit]
    todo, seen = [], set(done)
    for rid, record, error in records:
        if rid in seen:
            continue  # finished in an earlier run (or a duplicate id in the input)
        seen.add(rid)
        todo.append((rid, record, error))
    if todo and cfg.warmup:
        warm_up(engine, cfg.warmup)
    started = time.perf_counter()
    with open(cfg.output, "a", encoding="utf-8") as out:
        for rid, record, error in tqdm(todo, desc=cfg.spec.mode, disable=not progress or None):
            if error is None:
                try:
                    line = process(engine, rid, record, folder)
                except RecordError as e:
                    line = {"id": rid, "error": str(e)}
            else:
                line = {"id": rid, "error": error}
            out.write(json.dumps(line) + "\n")
            out.flush()
    return summarize(cfg, time.perf_counter() - started)


def summarize(cfg: ServeConfig, run_time_s: float) -> dict:
    """Summary over every record in the output file; also written to `<output>.summary.json`."""
    with open(cfg.output, encoding="utf-8") as f:
        lines = [json.loads(line) for line in f if line.strip()]
    ok = [r for r in lines if "error" not in r]
    graded = [r for r in ok if "correct" in r]
    proposed = sum(r["proposed"] for r in ok)
    latencies = [r["latency_s"] for r in ok]
    summary = {
        "mode": cfg.spec.mode,
        "n": len(lines),
        "n_errors": len(lines) - len(ok),
        "n_graded": len(graded),
        "accuracy": sum(r["correct"] for r in graded) / len(graded) if graded else None,
        "mean_latency_s": sum(latencies) / len(latencies) if latencies else None,
        "total_time_s": sum(latencies),
        "run_time_s": run_time_s,
        "acceptance_rate": sum(r["accepted"] for r in ok) / proposed if proposed else None,
        "accepted_per_target_call": (
            sum(r["accepted"] for r in ok) / max(1, sum(r["target_calls"] for r in ok))
        ),
        "tokens_per_s": sum(r["new_tokens"] for r in ok) / max(sum(latencies), 1e-9),
        "alpha": cfg.spec.alpha,
        "window": cfg.spec.window,
        "fallback": cfg.spec.fallback,
    }
    with open(cfg.output + ".summary.json", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    return summary
