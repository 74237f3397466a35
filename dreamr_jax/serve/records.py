"""Input records of serve.py: reading the JSONL file and checking each record's fields.

A record is `{"id", "image": path | [paths], "question", "answer"?, "answer_type"?}`, image paths
relative to the input file's folder (DESIGN.md section 6). Everything here raises `RecordError`
with a message naming the line or field at fault; the batch loop turns it into that record's
`error` line.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from dreamr_jax.config.schema import ANSWER_TYPES


class RecordError(ValueError):
    """A problem with one input record; becomes that record's `error`."""


@dataclasses.dataclass(frozen=True)
class InputRecord:
    """One non-empty input line: its id (`line-<n>` where the line has no usable id of its
    own), the parsed record, or the error that makes it unanswerable."""

    id: str
    line: int
    record: dict | None
    error: str | None = None


def read_records(path: str | Path) -> Iterator[InputRecord]:
    """Every non-empty line of the input file, in order.

    A line that is not a JSON object with a string id, or whose id an earlier line already
    used, is an error keyed by its line (`line-17`), so that every id of the output still
    stands for one input line and a rerun skips exactly what was answered."""
    first_line: dict[str, int] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            key = f"line-{number}"
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                yield InputRecord(key, number, None, f"line {number}: malformed JSON ({e.msg})")
                continue
            if not isinstance(record, dict):
                yield InputRecord(key, number, None, f"line {number}: not a JSON object")
                continue
            rid = record.get("id")
            if not isinstance(rid, str) or not rid:
                error = f"line {number}: missing or non-string field 'id'"
                yield InputRecord(key, number, None, error)
                continue
            if rid in first_line:
                error = (
                    f"line {number}: duplicate id {rid!r} (first used on line {first_line[rid]})"
                )
                yield InputRecord(key, number, None, error)
                continue
            first_line[rid] = number
            yield InputRecord(rid, number, record)


def question_of(record: dict) -> str:
    """The record's question, checked to be text a tokenizer can take."""
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        raise RecordError("missing or empty field 'question'")
    try:
        question.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON allows lone surrogates ("\ud800"); tokenizers do not
        raise RecordError(
            f"field 'question' is not valid Unicode text ({e.reason} at character {e.start})"
        ) from None
    return question


def answer_type_of(record: dict, default: str) -> str:
    """The record's `answer_type` (data/answers.py), or `default` where it names none."""
    kind = record.get("answer_type", default)
    if kind not in ANSWER_TYPES:
        raise RecordError(f"field 'answer_type' must be one of {', '.join(ANSWER_TYPES)}")
    return kind


def gold_answer(record: dict) -> str | None:
    """The record's gold `answer` as text (a JSON number is taken as written), or None."""
    answer = record.get("answer")
    if answer is None:
        return None
    if isinstance(answer, bool) or not isinstance(answer, str | int | float):
        raise RecordError("field 'answer' must be text or a number")
    return str(answer)


def image_paths(record: dict, max_images: int) -> list[str]:
    """The record's image paths (one path or a list), at most `max_images` of them."""
    paths = record.get("image")
    if paths is None:
        raise RecordError("missing field 'image'")
    paths = [paths] if isinstance(paths, str) else paths
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
        raise RecordError("field 'image' must be a path or a non-empty list of paths")
    if len(paths) > max_images:
        raise RecordError(
            f"field 'image' lists {len(paths)} images, over data.max_images={max_images}"
        )
    return paths


def load_image(folder: Path, path: str, max_pixels: int) -> Image.Image:
    """One image as RGB; its size is checked from the file's header before it is decoded."""
    try:
        with Image.open(folder / path) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise RecordError(
                    f"image {path} is {width}x{height} = {width * height:,} pixels, over "
                    f"data.max_image_pixels={max_pixels:,}"
                )
            return image.convert("RGB")
    except RecordError:
        raise
    except FileNotFoundError:
        raise RecordError(f"image not found: {path}") from None
    except Image.DecompressionBombError as e:  # not an OSError: PIL's own size limit
        raise RecordError(f"image {path} is too large to decode: {e}") from None
    except (OSError, ValueError, SyntaxError) as e:  # PIL reports bad files with all three
        raise RecordError(f"unreadable image {path}: {type(e).__name__}: {e}") from None
