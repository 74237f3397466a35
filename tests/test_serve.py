"""serve.py keeps its promises under bad input: a bad record becomes its error line without
stopping the batch, only a failure of the process stops a run, a killed or damaged run's output
is finished with every id exactly once, one output has one writer and one set of settings, and
a bad config or path fails before any work."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib

import pytest
from PIL import Image
from tiny_pair import make_tiny_pair

import serve
from dreamr_jax.config import load_config
from dreamr_jax.config.schema import DEFAULT_ALPHA, ServeConfig
from dreamr_jax.data import digitmath
from dreamr_jax.serve import batch
from dreamr_jax.serve.checkpoints import CALIBRATION_FILE, weights_digest
from dreamr_jax.serve.main import with_pair_alpha
from dreamr_jax.speculative.batch import RowBatch
from dreamr_jax.speculative.engine import Engine
from dreamr_jax.speculative.records import Solution

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _records(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    target, draft = make_tiny_pair(str(tmp_path_factory.mktemp("pair")))
    return [
        f"target.path={target}",
        f"draft.path={draft}",
        "spec.max_new_tokens=24",
        "spec.max_step_tokens=8",
        "compilation_cache=",  # in-process runs: leave ~/.cache alone
    ]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    digitmath.write_split(digitmath.generate_problems("test", 8, 0), folder, "test")
    return folder


def _args(data_dir, out, models, *extra) -> list[str]:
    """serve.py's arguments for the test split into `out`, without warm-up."""
    return [f"data.input={data_dir / 'test.jsonl'}", f"output={out}", "warmup=0", *models, *extra]


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares a size and holds almost nothing: PIL reads the size from the header,
    so the test needs no gigapixel image to poison a record."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\0" * 16))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + idat + chunk(b"IEND", b"")


@pytest.mark.parametrize("rows", [1, 8])
def test_poison_records_get_errors_and_the_batch_goes_on(data_dir, models, tmp_path, rows):
    good = _records(data_dir / "test.jsonl")[:3]
    images = data_dir / "images"
    (images / "broken.png").write_bytes(b"not a png")
    Image.new("L", (4000, 10)).save(images / "wide.png")  # aspect ratio 400: processor refuses
    (images / "bomb.png").write_bytes(_png_header(14000, 13000))  # PIL's DecompressionBombError
    (images / "large.png").write_bytes(_png_header(7000, 7000))  # over data.max_image_pixels
    (images / "folder.png").mkdir(exist_ok=True)
    image = good[0]["image"]
    poison = {
        "line-2": '{"id": "torn", "question": ',
        "no-question": {"id": "no-question", "image": image},
        "no-image-field": {"id": "no-image-field", "question": "What?"},
        "missing-file": {"id": "missing-file", "image": "images/nope.png", "question": "Q?"},
        "unreadable": {"id": "unreadable", "image": "images/broken.png", "question": "Q?"},
        "line-7": {"image": image, "question": "no id"},
        "too-long": {**good[0], "id": "too-long", "question": "seven " * 5000},
        "wide": {**good[0], "id": "wide", "image": "images/wide.png"},
        "bomb": {**good[0], "id": "bomb", "image": "images/bomb.png"},
        "large": {**good[0], "id": "large", "image": "images/large.png"},
        "surrogate": {**good[0], "id": "surrogate", "question": "\ud800"},
        "many-images": {**good[0], "id": "many-images", "image": [image] * 17},
        "folder": {**good[0], "id": "folder", "image": "images/folder.png"},
        "image-number": {**good[0], "id": "image-number", "image": 7},
        "line-17": {**good[1]},  # good[1]'s id again
    }
    lines = [json.dumps(good[0])]
    lines += [p if isinstance(p, str) else json.dumps(p) for p in list(poison.values())[:-1]]
    lines += [json.dumps(good[1]), json.dumps(poison["line-17"]), json.dumps(good[2])]
    path = data_dir / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    args = [f"data.input={path}", f"output={out}", "spec.mode=target", "warmup=1", *models]
    args.append(f"batch_size={rows}")
    assert serve.main(args) == 0
    records = {r["id"]: r for r in _records(out)}
    assert len(records) == len(lines) == len(poison) + 3
    for record in good:
        answered = records[record["id"]]
        assert "error" not in answered and answered["correct"] in (True, False)
        assert answered["output"] and answered["steps"]
    errors = {rid: r["error"] for rid, r in records.items() if "error" in r}
    assert set(errors) == set(poison)
    expected = {
        "line-2": "malformed JSON",
        "no-question": "'question'",
        "no-image-field": "'image'",
        "missing-file": "not found: images/nope.png",
        "unreadable": "unreadable image images/broken.png",
        "line-7": "'id'",
        "too-long": "exceeds the model's limit",
        "wide": "field 'image': ValueError: absolute aspect ratio",
        "bomb": "image images/bomb.png is too large to decode",
        "large": "7000x7000 = 49,000,000 pixels, over data.max_image_pixels",
        "surrogate": "field 'question' is not valid Unicode",
        "many-images": "17 images, over data.max_images=16",
        "folder": "unreadable image images/folder.png",
        "image-number": "field 'image' must be a path",
        "line-17": f"duplicate id '{good[1]['id']}' (first used on line 16)",
    }
    for rid, fragment in expected.items():
        assert fragment in errors[rid], (rid, errors[rid])
    summary = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
    assert summary["n"] == len(lines) and summary["n_errors"] == len(poison)
    assert summary["mode"] == "target" and summary["settings"]["spec"]["mode"] == "target"
    # Latencies leave out the warm-up, which ran in the middle of the first good record (one at
    # a time they add up to at most the run's time; in flight together they overlap).
    if rows == 1:
        assert 0 < summary["total_time_s"] <= summary["run_time_s"]
    assert summary["throughput"] == pytest.approx(len(good) / summary["run_time_s"])
    # A rerun answers nothing again: every id, the duplicate's line key included, is done.
    assert serve.main(args) == 0
    assert [r["id"] for r in _records(out)] == list(records)


def test_no_warm_up_when_every_record_is_an_error(data_dir, models, tmp_path, monkeypatch):
    def fail(*_):
        raise AssertionError("warmed up for nothing")

    monkeypatch.setattr(batch, "warm_up", fail)
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "a", "question": "Q?"}\nnot json\n')
    out = tmp_path / "out.jsonl"
    args = [f"data.input={path}", f"output={out}", "spec.mode=target", "warmup=2", *models]
    assert serve.main(args) == 0
    assert [("error" in r) for r in _records(out)] == [True, True]


def test_a_process_failure_stops_the_run_and_keeps_what_was_answered(
    data_dir, models, tmp_path, monkeypatch, capsys
):
    answer = Engine.answer
    calls = []

    def runs_out_of_memory_once(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError("host out of memory")
        return answer(self, *args)

    monkeypatch.setattr(Engine, "answer", runs_out_of_memory_once)
    out = tmp_path / "out.jsonl"
    args = _args(data_dir, out, models, "spec.mode=target", "data.limit=3")
    assert serve.main(args) == 1
    message = capsys.readouterr().err
    assert "the run stopped: record 'test-00001' (line 2): MemoryError" in message
    assert "run the same command again" in message
    assert [r["id"] for r in _records(out)] == ["test-00000"]  # nothing recorded for test-00001
    assert json.loads((tmp_path / "out.jsonl.summary.json").read_text())["n"] == 1
    assert not (tmp_path / "out.jsonl.lock").exists()
    assert serve.main(args) == 0
    assert [r["id"] for r in _records(out)] == [f"test-{i:05d}" for i in range(3)]


def test_a_process_failure_in_a_batch_stops_the_run_and_keeps_what_was_answered(
    data_dir, models, tmp_path, monkeypatch, capsys
):
    run = RowBatch.run
    calls = []

    def runs_out_of_memory_once(self):
        calls.append(1)
        if len(calls) == 2:  # the first call finished at least one row
            raise MemoryError("host out of memory")
        return run(self)

    monkeypatch.setattr(RowBatch, "run", runs_out_of_memory_once)
    out = tmp_path / "out.jsonl"
    args = _args(data_dir, out, models, "spec.mode=exact", "batch_size=3", "data.limit=6")
    assert serve.main(args) == 1
    message = capsys.readouterr().err
    assert (
        "the run stopped: the batch of records 'test-0000" in message and "MemoryError" in message
    )
    kept = [r["id"] for r in _records(out)]
    assert 0 < len(kept) < 6
    assert json.loads((tmp_path / "out.jsonl.summary.json").read_text())["n"] == len(kept)
    assert serve.main(args) == 0
    ids = [r["id"] for r in _records(out)]
    assert sorted(ids) == [f"test-{i:05d}" for i in range(6)] and ids[: len(kept)] == kept


def test_a_batch_of_requests_answers_as_one_at_a_time(data_dir, models, tmp_path):
    """8 problems through 3 rows refilled as they finish: the same output lines (answers, steps
    and counters) as one request at a time (CPN p within float rounding: a batch adds up its
    rows' sums in another order). `dreamr` here; test_batch.py holds every device-loop mode's
    batch to its one-at-a-time chains."""
    answers, p = {}, {}
    for rows in (1, 3):
        out = tmp_path / f"out-{rows}.jsonl"
        args = _args(data_dir, out, models, "spec.mode=dreamr", f"batch_size={rows}")
        assert serve.main([*args, "spec.alpha=0.5"]) == 0
        records = sorted(_records(out), key=lambda r: r["id"])
        p[rows] = [s.pop("p", None) for r in records for s in r["steps"]]
        answers[rows] = [
            {k: v for k, v in r.items() if k not in ("latency_s", "settings")} for r in records
        ]
    assert answers[3] == answers[1] and len(answers[1]) == 8
    assert [x is None for x in p[3]] == [x is None for x in p[1]]
    got, want = ([x for x in p[rows] if x is not None] for rows in (3, 1))
    assert got == pytest.approx(want, abs=1e-5)


def test_a_damaged_output_line_is_moved_out_and_its_id_answered_again(data_dir, models, tmp_path):
    out = tmp_path / "out.jsonl"
    args = _args(data_dir, out, models, "spec.mode=target", "data.limit=4")
    assert serve.main(args) == 0
    lines = out.read_text().splitlines()
    middle = lines[1][: len(lines[1]) // 2]  # test-00001, cut in the middle
    edited = {**json.loads(lines[2]), "latency_s": "slow"}  # test-00002, unusable by hand
    out.write_text("\n".join([lines[0], middle, json.dumps(edited), lines[3], lines[0]]) + "\n")
    assert serve.main(args) == 0
    ids = [r["id"] for r in _records(out)]
    assert sorted(ids) == [f"test-{i:05d}" for i in range(4)]
    damaged = (tmp_path / "out.jsonl.damaged").read_text().splitlines()
    assert damaged == [middle, json.dumps(edited), lines[0]]
    summary = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
    assert summary["n"] == 4 and summary["n_errors"] == 0 and summary["lines_moved"] == 3


def test_an_output_of_other_settings_is_refused_unless_asked(data_dir, models, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    args = _args(data_dir, out, models, "data.limit=2")
    assert serve.main([*args, "spec.mode=target"]) == 0
    before = out.read_text()
    assert serve.main([*args, "spec.mode=draft"]) == 2
    assert "spec.mode: 'target' there, 'draft' now" in capsys.readouterr().err
    assert out.read_text() == before
    mixed = [*args, "spec.mode=draft", "allow_mixed_settings=true", "data.limit=3"]
    assert serve.main(mixed) == 0
    summary = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
    assert summary["mode"] == "mixed" and summary["n"] == 3
    groups = [(g["records"], g["settings"]["spec"]["mode"]) for g in summary["settings"]]
    assert groups == [(2, "target"), (1, "draft")]


def test_two_runs_on_one_output_one_refuses_the_other_finishes(data_dir, models, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    args = _args(data_dir, out, models, "spec.mode=target")
    cmd = [sys.executable, "serve.py", *args]
    first = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock = tmp_path / "out.jsonl.lock"
    deadline = time.time() + 120
    while time.time() < deadline and not (lock.exists() and lock.read_text().strip()):
        time.sleep(0.01)
    # The second run, in this process (JAX already imported), tries while the first one is still
    # loading its models.
    assert serve.main(args) == 2
    assert first.wait(timeout=300) == 0
    message = f"output {out} is being written by another serve.py run (pid {first.pid}"
    assert message in capsys.readouterr().err
    ids = [r["id"] for r in _records(out)]
    assert sorted(ids) == [f"test-{i:05d}" for i in range(8)]


@pytest.mark.parametrize("rows", [1, 3])
def test_killed_run_resumes_every_id_exactly_once(data_dir, models, tmp_path, rows):
    out = tmp_path / "resume.jsonl"
    cmd = [
        sys.executable,
        "serve.py",
        f"data.input={data_dir / 'test.jsonl'}",
        f"output={out}",
        "spec.mode=dreamr",
        f"batch_size={rows}",
        "warmup=0",
        *(m for m in models if not m.startswith("compilation_cache=")),
        # A cache that the kill may leave half-written, read by the rerun.
        f"compilation_cache={tmp_path / 'xla'}",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and len(out.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(_records(out)) if out.exists() else 0
    assert 0 < partial < 8, "the run should be killed mid-batch"
    assert (tmp_path / "resume.jsonl.lock").exists(), "the killed run leaves a stale lock file"
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = _records(out)
    ids = [r["id"] for r in records]
    assert sorted(ids) == sorted(f"test-{i:05d}" for i in range(8))
    assert all("error" not in r and "output" in r and "latency_s" in r for r in records)


@pytest.mark.parametrize(
    "override, key",
    [
        ("spec.window=1000000000", "spec.window"),
        ("spec.max_new_tokens=0", "spec.max_new_tokens"),
        ("target.path={missing}", "target.path"),
        ("draft.path={tmp}", "draft.path"),  # a folder without config.json
        ("data.input={tmp}", "data.input"),
        ("data.input={missing}", "data.input"),
        ("output={tmp}", "output"),
        ("output={file}/out.jsonl", "output"),  # its folder is a file
        ("batch_size=0", "batch_size"),
        ("batch_size=4 spec.mode=specreason", "batch_size"),  # a host loop: one at a time
        ("batch_size=4 spec.schedule=fpsr", "batch_size"),
        ("parallel.draft_devices=2", "parallel.draft_devices"),  # target_devices unset
        ("parallel.draft_devices=8 parallel.target_devices=8", "parallel.target_devices"),
    ],
)
def test_bad_config_or_path_fails_before_any_work(override, key, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    override = override.format(missing=tmp_path / "nope", tmp=tmp_path, file=tmp_path / "file")
    out = tmp_path / "never.jsonl"
    assert serve.main([f"output={out}", *override.split()]) == 2
    err = capsys.readouterr().err
    assert err.startswith("config error: ") and f"{key}: " in err
    assert not out.exists() and not (tmp_path / "digitmath-test").exists()


def test_a_config_path_that_is_a_folder_is_a_config_error(tmp_path, capsys):
    assert serve.main([str(tmp_path), f"output={tmp_path / 'out.jsonl'}"]) == 2
    assert "is a folder, not a YAML config file" in capsys.readouterr().err


def test_serving_takes_the_pairs_calibrated_alpha_unless_one_is_given(models, tmp_path):
    target = next(m.split("=", 1)[1] for m in models if m.startswith("target.path="))
    draft = tmp_path / "draft"
    shutil.copytree(next(m.split("=", 1)[1] for m in models if m.startswith("draft.path=")), draft)
    paths = [f"target.path={target}", f"draft.path={draft}"]
    assert with_pair_alpha(load_config(None, paths, cls=ServeConfig)).spec.alpha == DEFAULT_ALPHA
    calibration = {"alpha": 0.42, "target_sha256": weights_digest(target)}
    (draft / CALIBRATION_FILE).write_text(json.dumps(calibration))
    assert with_pair_alpha(load_config(None, paths, cls=ServeConfig)).spec.alpha == 0.42
    given = load_config(None, [*paths, "spec.alpha=0.9"], cls=ServeConfig)
    assert with_pair_alpha(given).spec.alpha == 0.9


GRADED = [  # (record fields, the model's output, correct?)
    ({"answer": "B"}, "Looking at the options.\nAnswer: B", True),
    ({"answer": "(C)"}, "The answer is (A).", False),
    ({"answer": "12.5"}, "The side is 12.50 cm, so the answer is 12.50", True),
    ({"answer": "3.14159", "answer_type": "number"}, "The answer is 3.1416.", True),
    ({"answer": 42}, "Answer: 42", True),  # a JSON number
    ({"answer": "The Eiffel Tower"}, "It is in Paris.\nThe answer is: eiffel tower!", True),
    ({"answer": "77", "answer_type": "digitmath"}, "The answer is **77**.", True),
    ({"answer": "Paris", "answer_type": "letter"}, None, None),  # an unknown type: error line
]


def test_serve_grades_each_answer_type(models, tmp_path, monkeypatch):
    """A user's file of multiple-choice, numeric and free-text records (types named per record
    or read off the gold answer) is graded by each record's type; DigitMath keeps its own."""
    Image.new("RGB", (40, 24), "white").save(tmp_path / "blank.png")
    with open(tmp_path / "mixed.jsonl", "w") as f:
        for i, (fields, _, _) in enumerate(GRADED):
            record = {"id": f"r{i}", "image": "blank.png", "question": f"Question {i}?", **fields}
            f.write(json.dumps(record) + "\n")
    outputs = iter(text for _, text, _ in GRADED if text is not None)
    # The models are random: the test gives each record the output it grades.
    monkeypatch.setattr(Engine, "answer", lambda self, ids, inputs, started: Solution([0], []))
    monkeypatch.setattr(Engine, "decode", lambda self, tokens: next(outputs) if tokens else "")
    out = tmp_path / "out.jsonl"
    args = [f"data.input={tmp_path / 'mixed.jsonl'}", f"output={out}", "warmup=0", *models]
    assert serve.main(args) == 0
    by_id = {r["id"]: r for r in _records(out)}
    for i, (_, _, correct) in enumerate(GRADED):
        record = by_id[f"r{i}"]
        if correct is None:
            assert "answer_type" in record["error"]
        else:
            assert record["correct"] is correct, record
    assert [by_id[f"r{i}"]["answer_type"] for i in range(3)] == ["choice", "choice", "number"]
    assert by_id["r5"]["answer_type"] == "text" and by_id["r5"]["prediction"] == "eiffel tower"
    summary = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
    assert summary["input"] == str((tmp_path / "mixed.jsonl").resolve())
    assert set(summary["provenance"]) == {"commit", "dirty", "command"}


def test_the_warm_up_compiles_on_the_input_s_own_records(models, tmp_path, monkeypatch):
    """The warm-up answers the first records that can be answered (a bad one skipped), not
    DigitMath problems, whose shapes a user's images and prompts do not share."""
    Image.new("RGB", (72, 40), "white").save(tmp_path / "wide.png")
    with open(tmp_path / "own.jsonl", "w") as f:
        f.write(json.dumps({"id": "bad", "image": "missing.png", "question": "Lost?"}) + "\n")
        for i in range(3):
            record = {"id": f"r{i}", "image": "wide.png", "question": f"Wide question {i}?"}
            f.write(json.dumps(record) + "\n")
    warmed = []
    warm_up = Engine.warm_up
    monkeypatch.setattr(
        Engine,
        "warm_up",
        lambda self, ids, inputs: (warmed.append(self.decode(ids)), warm_up(self, ids, inputs)),
    )
    monkeypatch.setattr(digitmath, "generate_problems", None)  # no DigitMath warm-up
    out = tmp_path / "out.jsonl"
    args = [f"data.input={tmp_path / 'own.jsonl'}", f"output={out}", "warmup=2", *models]
    assert serve.main([*args, "spec.mode=target"]) == 0
    assert len(warmed) == 2
    assert "Wide question 0?" in warmed[0] and "Wide question 1?" in warmed[1]
    assert len(_records(out)) == 4


def test_serving_imports_no_training_package():
    """Serving and its benchmarks run where only the inference stack is installed (the GPU
    machines' image has no grain, training's data pipeline)."""
    code = (
        "import runpy, sys; sys.modules['grain'] = None; sys.path.insert(0, 'bench')\n"
        "import serve, dreamr_jax.report, dreamr_jax.plan\n"
        "for script in ('target_vs_dreamr', 'batched', 'placement_check'):\n"
        "    runpy.run_path(f'bench/{script}.py', run_name='imported')"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
