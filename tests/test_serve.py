"""serve.py: bad records become error lines without stopping the batch, a killed run resumes with
every id exactly once, and a bad config fails before any work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from tiny_pair import make_tiny_pair

import serve
from dreamr_jax.data import digitmath

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


def test_bad_records_get_errors_and_the_batch_goes_on(data_dir, models, tmp_path):
    good = _records(data_dir / "test.jsonl")[:2]
    (data_dir / "images" / "broken.png").write_bytes(b"not a png")
    lines = [json.dumps(good[0])]
    lines.append('{"id": "torn", "question": ')  # malformed JSON
    lines.append(json.dumps({"id": "no-question", "image": good[0]["image"]}))
    lines.append(json.dumps({"id": "no-image-field", "question": "What?"}))
    lines.append(json.dumps({"id": "missing-file", "image": "images/nope.png", "question": "Q?"}))
    lines.append(json.dumps({"id": "unreadable", "image": "images/broken.png", "question": "Q?"}))
    lines.append(json.dumps({"image": good[0]["image"], "question": "no id"}))
    lines.append(json.dumps({**good[0], "id": "too-long", "question": "seven " * 5000}))
    lines.append(json.dumps(good[1]))
    path = data_dir / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    args = [f"data.input={path}", f"output={out}", "spec.mode=target", "warmup=0", *models]
    assert serve.main(args) == 0
    records = {r["id"]: r for r in _records(out)}
    assert len(records) == 9
    for rid in (good[0]["id"], good[1]["id"]):
        assert "error" not in records[rid] and records[rid]["correct"] in (True, False)
        assert "output" in records[rid] and records[rid]["steps"]
    errors = {rid: r["error"] for rid, r in records.items() if "error" in r}
    assert "malformed JSON" in errors["line-2"]
    assert "'question'" in errors["no-question"]
    assert "'image'" in errors["no-image-field"]
    assert "not found: images/nope.png" in errors["missing-file"]
    assert "unreadable image images/broken.png" in errors["unreadable"]
    assert "'id'" in errors["line-7"]
    assert "exceeds the model's limit" in errors["too-long"]
    summary = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
    assert summary["n"] == 9 and summary["n_errors"] == 7 and summary["mode"] == "target"


def test_bad_config_fails_before_any_work(tmp_path):
    out = tmp_path / "never.jsonl"
    assert serve.main([f"output={out}", "spec.window=0"]) == 2
    assert not out.exists()


def test_killed_run_resumes_every_id_exactly_once(data_dir, models, tmp_path):
    out = tmp_path / "resume.jsonl"
    cmd = [
        sys.executable,
        "serve.py",
        f"data.input={data_dir / 'test.jsonl'}",
        f"output={out}",
        "spec.mode=dreamr",
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
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = _records(out)
    ids = [r["id"] for r in records]
    assert sorted(ids) == sorted(f"test-{i:05d}" for i in range(8))
    assert all("error" not in r and "output" in r and "latency_s" in r for r in records)
