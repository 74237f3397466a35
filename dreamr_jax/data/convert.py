"""Benchmarks the paper reports, from their public release formats into serve.py's input.

    python -m dreamr_jax.data.convert {mathverse,mmbench,realworldqa,mmmu} SRC OUT.jsonl

writes OUT.jsonl (DESIGN.md section 6: `{"id", "image", "question", "answer"?, "answer_type"}`)
and the images, as files, into `OUT_images/` beside it (paths in the records are relative to
OUT's folder, as serve.py reads them). Each benchmark keeps its own ids and gets the answer type
it is graded by (`data/answers.py`):

- `mmbench`: the TSV of OpenCompass / VLMEvalKit (`index`, `question`, `hint`, options `A`-`E`,
  `answer`, `image` as base64, or the index of the row whose image it shares). `choice`; the
  options and the hint go into the question.
- `mmmu`: the Hugging Face parquet files (`id`, `question`, `options` as a Python list literal,
  `answer`, `question_type`, `image_1`-`image_7` with their bytes), one file or a folder of
  them (one per subject). `choice` for multiple-choice questions (options added), else `auto`.
- `realworldqa`: the Hugging Face parquet (`image` with its bytes, `question` with its options
  and instruction, `answer`). `auto`: a letter, a number or a word.
- `mathverse`: `testmini.json` (`sample_index`, `question`, `image` a file under `images/`
  beside the JSON, `answer`, `question_type`), or the parquet with embedded images.
  `choice` for multi-choice questions, else `auto`.

A row that cannot be converted is reported on stderr with its id and skipped; the rest goes on.
Parquet needs pyarrow (`pip install -e '.[convert]'`).
"""

from __future__ import annotations

import argparse
import ast
import base64
import binascii
import csv
import io
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from PIL import Image

LETTERS = "ABCDEFGHIJ"


class ConvertError(ValueError):
    """A source row that cannot become a record; the conversion skips it and says why."""


def options_text(options: list[str]) -> str:
    """Options as lines `A. text`, and the instruction every multiple-choice record gets."""
    if not 1 < len(options) <= len(LETTERS):
        raise ConvertError(f"{len(options)} options (2-{len(LETTERS)} expected)")
    lines = [f"{letter}. {text}" for letter, text in zip(LETTERS, options, strict=False)]
    return "\n".join([*lines, "Answer with the option's letter."])


def _blank(value) -> bool:
    """Empty cells of the releases: None, "", and pandas' "nan" written into TSVs."""
    return value is None or str(value).strip() in ("", "nan", "NaN", "None")


def _image_bytes(cell) -> bytes:
    """An image cell's bytes: Hugging Face's `{"bytes", "path"}` struct, or raw bytes."""
    data = cell.get("bytes") if isinstance(cell, dict) else cell
    if not isinstance(data, bytes | bytearray) or not data:
        raise ConvertError("an image cell without bytes")
    return bytes(data)


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ConvertError(f"image is not base64 ({e})") from None


# ----------------------------------------------------------------------------- readers
# Each yields (id, question, answer or None, answer type, [image bytes]) per source row, or
# raises ConvertError for the row (with its id) to be skipped.

Row = tuple[str, str, str | None, str, list[bytes]]


def _parquet_rows(src: Path) -> Iterator[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SystemExit("reading parquet needs pyarrow: pip install -e '.[convert]'") from None
    files = sorted(src.rglob("*.parquet")) if src.is_dir() else [src]
    if not files:
        raise ConvertError(f"{src}: no .parquet files in this folder")
    for file in files:
        try:
            table = pq.read_table(file)
        except Exception as e:  # pyarrow reports a bad file with several exception types
            raise ConvertError(f"{file}: not a readable parquet file ({e})") from None
        yield from table.to_pylist()


def mmbench(src: Path) -> Iterator[Row | ConvertError]:
    csv.field_size_limit(2**31 - 1)  # a base64 image is one field
    with open(src, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    images = {row.get("index"): row.get("image", "") for row in rows}
    for row in rows:
        rid = f"mmbench-{row.get('index')}"
        try:
            image = row.get("image") or ""
            # VLMEvalKit's TSVs store an image once; rows that share it hold its row's index.
            if len(image) < 16 and image in images:
                image = images[image]
            options = [row[x] for x in "ABCDE" if not _blank(row.get(x))]
            question = row.get("question") or ""
            if _blank(question):
                raise ConvertError("no question")
            hint = "" if _blank(row.get("hint")) else f"Hint: {row['hint']}\n"
            answer = None if _blank(row.get("answer")) else row["answer"].strip()
            yield rid, f"{hint}{question}\n{options_text(options)}", answer, "choice", [_b64(image)]
        except ConvertError as e:
            yield ConvertError(f"{rid}: {e}")


def mmmu(src: Path) -> Iterator[Row | ConvertError]:
    for i, row in enumerate(_parquet_rows(src)):
        rid = str(row.get("id") or f"mmmu-{i}")
        try:
            images = [_image_bytes(row[f"image_{k}"]) for k in range(1, 8) if row.get(f"image_{k}")]
            if not images:
                raise ConvertError("no image")
            question = str(row.get("question") or "")
            kind = "auto"
            if row.get("question_type") == "multiple-choice":
                try:
                    options = ast.literal_eval(row.get("options") or "[]")  # a literal, no code
                except (ValueError, SyntaxError) as e:
                    raise ConvertError(f"options are not a list literal ({e})") from None
                question, kind = f"{question}\n{options_text([str(o) for o in options])}", "choice"
            answer = None if _blank(row.get("answer")) else str(row["answer"]).strip()
            yield rid, question, answer, kind, images
        except ConvertError as e:
            yield ConvertError(f"{rid}: {e}")


def realworldqa(src: Path) -> Iterator[Row | ConvertError]:
    for i, row in enumerate(_parquet_rows(src)):
        rid = f"realworldqa-{i:05d}"
        try:
            answer = None if _blank(row.get("answer")) else str(row["answer"]).strip()
            yield (
                rid,
                str(row.get("question") or ""),
                answer,
                "auto",
                [_image_bytes(row.get("image"))],
            )
        except ConvertError as e:
            yield ConvertError(f"{rid}: {e}")


def mathverse(src: Path) -> Iterator[Row | ConvertError]:
    if src.suffix == ".json":
        with open(src, encoding="utf-8") as f:
            rows = json.load(f)
    else:
        rows = _parquet_rows(src)
    for i, row in enumerate(rows):
        rid = f"mathverse-{row.get('sample_index', i)}"
        try:
            image = row.get("image")
            if isinstance(image, str):  # the JSON release: a file under images/
                path = src.parent / "images" / image
                if not path.is_file():
                    raise ConvertError(f"image not found: {path}")
                images = [path.read_bytes()]
            else:
                images = [_image_bytes(image)]
            kind = "choice" if row.get("question_type") == "multi-choice" else "auto"
            answer = None if _blank(row.get("answer")) else str(row["answer"]).strip()
            yield rid, str(row.get("question") or ""), answer, kind, images
        except ConvertError as e:
            yield ConvertError(f"{rid}: {e}")


CONVERTERS: dict[str, Callable[[Path], Iterator[Row | ConvertError]]] = {
    "mathverse": mathverse,
    "mmbench": mmbench,
    "realworldqa": realworldqa,
    "mmmu": mmmu,
}


# ----------------------------------------------------------------------------- writing


def _save_image(data: bytes, folder: Path, stem: str) -> str:
    """The image's bytes as a file named by its own format (checked by decoding it)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            suffix = (image.format or "png").lower().replace("jpeg", "jpg")
    except Exception as e:  # PIL reports bad data with several exception types
        raise ConvertError(f"unreadable image ({type(e).__name__}: {e})") from None
    path = folder / f"{stem}.{suffix}"
    path.write_bytes(data)
    return path.name


def _saved(rid: str, question: str, images: list[bytes], folder: Path) -> list[str]:
    """A row's images as files in `folder`, their paths relative to its parent."""
    if not question.strip():
        raise ConvertError(f"{rid}: no question")
    stems = [rid] if len(images) == 1 else [f"{rid}-{k}" for k in range(len(images))]
    try:
        pairs = zip(images, stems, strict=True)
        return [f"{folder.name}/{_save_image(data, folder, stem)}" for data, stem in pairs]
    except ConvertError as e:
        raise ConvertError(f"{rid}: {e}") from None


def convert(benchmark: str, src: Path, out: Path) -> tuple[int, int]:
    """Writes OUT.jsonl and its images from `src`; returns (records written, rows skipped)."""
    if not src.exists():
        raise ConvertError(f"{src}: no such file or folder")
    folder = out.parent / f"{out.stem}_images"
    folder.mkdir(parents=True, exist_ok=True)
    written = skipped = 0
    with open(out, "w", encoding="utf-8") as f:
        for row in CONVERTERS[benchmark](src):
            try:
                if isinstance(row, ConvertError):
                    raise row
                rid, question, answer, kind, images = row
                paths = _saved(rid, question, images, folder)
            except ConvertError as e:
                print(f"convert: skipped {e}", file=sys.stderr)
                skipped += 1
                continue
            record = {"id": rid, "image": paths, "question": question, "answer_type": kind}
            if answer is not None:
                record["answer"] = answer
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            written += 1
    return written, skipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dreamr_jax.data.convert", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("benchmark", choices=sorted(CONVERTERS))
    parser.add_argument("src", type=Path, help="the release file (or folder of parquet files)")
    parser.add_argument("out", type=Path, help="the JSONL to write (images go to OUT_images/)")
    args = parser.parse_args(argv)
    try:
        written, skipped = convert(args.benchmark, args.src, args.out)
    except (ConvertError, OSError, csv.Error, json.JSONDecodeError) as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 2
    print(
        f"{args.out}: {written} records ({skipped} rows skipped), images in {args.out.stem}_images/"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
