"""Converters from the benchmarks' release formats (`data/convert.py`), on small files the tests
write in those formats: every row becomes a record serve.py reads (its images load, its answer
type is the benchmark's), options join the question, and a bad row is skipped and named."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dreamr_jax.data import convert
from dreamr_jax.serve.records import answer_type_of, image_paths, load_image, read_records


def _image(colour: str, fmt: str = "PNG", size=(20, 12)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


def _converted(benchmark: str, src: Path, tmp_path: Path, capsys) -> tuple[dict, str]:
    out = tmp_path / "out" / f"{benchmark}.jsonl"
    out.parent.mkdir(exist_ok=True)
    assert convert.main([benchmark, str(src), str(out)]) == 0
    records = {}
    for item in read_records(out):  # serve.py's own reader and checks
        assert item.error is None
        answer_type_of(item.record, "auto")
        for path in image_paths(item.record, 16):
            load_image(out.parent, path, 10**8)
        records[item.id] = item.record
    return records, capsys.readouterr().err


def test_mmbench_tsv(tmp_path, capsys):
    src = tmp_path / "MMBench_DEV_EN.tsv"
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"]
    red = base64.b64encode(_image("red")).decode()
    rows = [
        [1, "What colour is it?", "nan", "blue", "red", "green", "grey", "B", "colour", red],
        [2, "Which is warm?", "Think of fire.", "ice", "snow", "flame", "nan", "C", "x", "1"],
        [3, "Broken image?", "nan", "a", "b", "nan", "nan", "A", "x", "%%%not base64"],
        [4, "Test split, no answer", "nan", "yes", "no", "nan", "nan", "nan", "x", red],
    ]
    with open(src, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(header)
        writer.writerows(rows)
    records, err = _converted("mmbench", src, tmp_path, capsys)
    assert sorted(records) == ["mmbench-1", "mmbench-2", "mmbench-4"]
    first = records["mmbench-1"]
    assert first["answer"] == "B" and first["answer_type"] == "choice"
    assert "A. blue\nB. red\nC. green\nD. grey" in first["question"]
    shared = records["mmbench-2"]  # its image is row 1's
    assert shared["question"].startswith("Hint: Think of fire.\nWhich is warm?")
    assert "D." not in shared["question"]  # a blank option is left out
    assert "answer" not in records["mmbench-4"]
    assert "mmbench-3" in err and "base64" in err


def _struct(data: bytes | None):
    return None if data is None else {"bytes": data, "path": "x"}


def test_mmmu_parquet_folder(tmp_path, capsys):
    folder = tmp_path / "MMMU"
    (folder / "Art").mkdir(parents=True)
    images = {f"image_{k}": [None, None, None] for k in range(1, 8)}
    images["image_1"] = [_struct(_image("red")), _struct(_image("blue", "JPEG")), None]
    images["image_2"] = [_struct(_image("green")), None, None]
    table = pa.table(
        {
            "id": ["validation_Art_1", "validation_Art_2", "validation_Art_3"],
            "question": ["<image 1> <image 2> Which is red?", "<image 1> How long?", "None?"],
            "options": ["['the first', 'the second']", "[]", "[]"],
            "answer": ["A", "12.5", "x"],
            "question_type": ["multiple-choice", "open", "open"],
            **images,
        }
    )
    pq.write_table(table, folder / "Art" / "validation-00000-of-00001.parquet")
    records, err = _converted("mmmu", folder, tmp_path, capsys)
    assert sorted(records) == ["validation_Art_1", "validation_Art_2"]
    choice = records["validation_Art_1"]
    assert choice["answer_type"] == "choice" and len(choice["image"]) == 2
    assert choice["question"].endswith(
        "A. the first\nB. the second\nAnswer with the option's letter."
    )
    open_ = records["validation_Art_2"]
    assert open_["answer_type"] == "auto" and open_["answer"] == "12.5"
    assert open_["image"][0].endswith(".jpg")  # named by its own format
    assert "validation_Art_3" in err and "no image" in err


def test_realworldqa_parquet(tmp_path, capsys):
    src = tmp_path / "test-00000-of-00002.parquet"
    table = pa.table(
        {
            "image": [_struct(_image("red")), _struct(_image("blue")), _struct(b"not an image")],
            "question": ["Which way? A. left B. right", "How many cars?", "Broken?"],
            "answer": ["B", "3", "C"],
        }
    )
    pq.write_table(table, src)
    records, err = _converted("realworldqa", src, tmp_path, capsys)
    assert [r["answer"] for r in records.values()] == ["B", "3"]
    assert {r["answer_type"] for r in records.values()} == {"auto"}
    assert "realworldqa-00002" in err and "unreadable image" in err


def test_mathverse_json_with_image_folder(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(_image("red"))
    rows = [
        {"sample_index": "1", "question": "Choices: A:1 B:2", "image": "a.png", "answer": "A",
         "question_type": "multi-choice"},
        {"sample_index": "2", "question": "Find x.", "image": "a.png", "answer": "5",
         "question_type": "free-form"},
        {"sample_index": "3", "question": "Lost?", "image": "gone.png", "answer": "1",
         "question_type": "free-form"},
    ]  # fmt: skip
    (tmp_path / "testmini.json").write_text(json.dumps(rows))
    records, err = _converted("mathverse", tmp_path / "testmini.json", tmp_path, capsys)
    assert records["mathverse-1"]["answer_type"] == "choice"
    assert (
        records["mathverse-2"]["answer_type"] == "auto" and records["mathverse-2"]["answer"] == "5"
    )
    assert "mathverse-3" in err and "image not found" in err


@pytest.mark.parametrize("benchmark", ["mmbench", "mmmu"])
def test_a_missing_source_is_exit_2_naming_it(tmp_path, capsys, benchmark):
    missing = tmp_path / "nope.tsv"
    assert convert.main([benchmark, str(missing), str(tmp_path / "out.jsonl")]) == 2
    assert str(missing) in capsys.readouterr().err
