"""The HTML report of a serve.py run (`python -m dreamr_jax.report`), on a small output written
here: every record with its escaped question, image, coloured steps and CPN p, the summary, the
unreadable lines listed rather than fatal, and exit 2 naming the file for a file it cannot read."""

from __future__ import annotations

import base64
import io
import json
import re

import pytest
from PIL import Image

from dreamr_jax import report

SETTINGS = {"spec": {"mode": "dreamr", "alpha": 0.8}, "seed": 0}
QUESTION = "Is 3 < 5 & 2 > 1?"
ANSWERED = {
    "id": "prob-1",
    "output": "3 < 5.\n\nBoth hold.\n\nThe answer is yes.",
    "prediction": "yes",
    "steps": [
        {"text": "3 < 5.\n\n", "author": "draft", "committed": True, "p": 0.91, "accepted": True},
        {
            "text": "<b>No</b>.\n\n",
            "author": "draft",
            "committed": False,
            "p": 0.12,
            "accepted": False,
        },
        {"text": "Both hold.\n\n", "author": "target", "committed": True},
        {
            "text": "The answer is yes.",
            "author": "draft",
            "committed": True,
            "p": 0.97,
            "accepted": True,
        },
    ],
    "latency_s": 0.0421,
    "new_tokens": 17,
    "proposed": 3,
    "accepted": 2,
    "target_calls": 2,
    "format_misses": 0,
    "answer": "yes",
    "correct": True,
    "settings": SETTINGS,
}
FAILED = {"id": "prob-2", "error": "image not found: <gone>.png", "settings": SETTINGS}
SUMMARY = {
    "mode": "dreamr",
    "n": 2,
    "n_errors": 1,
    "accuracy": 1.0,
    "mean_latency_s": 0.0421,
    "throughput": 12.5,
    "acceptance_rate": 0.6667,
    "settings": SETTINGS,
}


@pytest.fixture
def run(tmp_path):
    """An input file with a 4x3 image, and serve.py's output for it: one answer, one error
    record and a line cut off by a kill, with its summary."""
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    image = Image.new("RGB", (4, 3), (200, 30, 10))
    image.putpixel((1, 1), (0, 255, 0))
    image.save(data / "img" / "a.png")
    inputs = [
        {"id": "prob-1", "image": "img/a.png", "question": QUESTION, "answer": "yes"},
        {"id": "prob-2", "image": "img/<gone>.png", "question": "Which?"},
        {"id": "prob-3", "image": "img/a.png", "question": "Third?"},
    ]
    (data / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in inputs))
    out = tmp_path / "runs" / "out.jsonl"
    out.parent.mkdir()
    lines = [json.dumps(ANSWERED), json.dumps(FAILED), '{"id": "prob-3", "output": "The ro']
    out.write_text("\n".join(lines))
    (tmp_path / "runs" / "out.jsonl.summary.json").write_text(json.dumps(SUMMARY))
    return out, data / "in.jsonl", image


def _report(out, *args) -> str:
    page = out.with_name("report.html")
    assert report.main([str(out), *args, "--out", str(page)]) == 0
    return page.read_text(encoding="utf-8")


def test_report_shows_every_record(run, capsys):
    out, inputs, image = run
    before = out.read_bytes()
    page = _report(out, "--input", str(inputs))
    assert out.read_bytes() == before  # a report never repairs what it reports on
    assert 'id="p-prob-1"' in page and 'id="p-prob-2"' in page
    assert "Is 3 &lt; 5 &amp; 2 &gt; 1?" in page and QUESTION not in page
    # The image, embedded: decoded back, the same pixels
    uri = re.search(r'src="data:image/png;base64,([^"]+)"', page).group(1)
    with Image.open(io.BytesIO(base64.b64decode(uri))) as shown:
        assert shown.convert("RGB").tobytes() == image.tobytes()
    # Steps coloured by author, the refused one escaped and followed by its replacement
    assert '<span class="draft" title="draft, committed, CPN p = 0.910">3 &lt; 5.</span>' in page
    card = page[page.index('id="p-prob-1"') :]
    assert "&lt;b&gt;No&lt;/b&gt;." in card and "<b>No</b>" not in page
    refused, target = card.index('<span class="refused"'), card.index('<span class="target"')
    assert refused < target < card.index("The answer is yes.")
    assert '<sup class="p">0.910</sup>' in page and '<sup class="p no">0.120</sup>' in page
    assert "0.970" in page
    # The numbers of the record and of the summary
    assert "42.1 ms" in page and "2/3 drafts accepted" in page and "correct" in page
    assert "100.0%" in page and "12.5" in page and "66.7%" in page and "0.0421" in page
    assert page.count("<svg") == 3 and "alpha 0.8" in page
    # The error record, escaped, with its question; the cut-off line listed, not fatal
    assert "image not found: &lt;gone&gt;.png" in page and "Which?" in page
    assert "1 unreadable line(s)" in page and "line 3 (id &#x27;prob-3&#x27;): cut off" in page
    err = capsys.readouterr().err
    assert f"{out}: line 3" in err and "Traceback" not in err


def test_report_without_input_or_summary(run):
    out, _, _ = run
    out.with_name("out.jsonl.summary.json").unlink()
    page = _report(out)
    assert "pass --input" in page and "data:image" not in page and "prob-1" in page
    assert "computed from the records (no summary file)" in page
    assert "100.0%" in page  # serve.py's summarize over the records: 1 graded, right


def test_report_finds_servepy_default_input(tmp_path, run):
    out, inputs, _ = run
    default = out.parent / "digitmath-test"
    default.mkdir()
    (default / "img").mkdir()
    (inputs.parent / "img" / "a.png").rename(default / "img" / "a.png")
    inputs.rename(default / "test.jsonl")
    page = _report(out)
    assert "serve.py&#x27;s default input" in page and "data:image/png" in page


def test_report_reads_the_input_its_summary_names(run):
    out, inputs, _ = run
    summary = out.with_name("out.jsonl.summary.json")
    summary.write_text(json.dumps({**SUMMARY, "input": str(inputs)}))  # as serve.py writes it
    page = _report(out)
    assert "named by the run&#x27;s summary" in page and "data:image/png" in page


@pytest.mark.parametrize("which", ["output", "input"])
def test_unreadable_file_is_exit_2_naming_it(run, tmp_path, capsys, which):
    out, inputs, _ = run
    missing = tmp_path / "nowhere" / f"{which}.jsonl"
    args = [str(missing)] if which == "output" else [str(out), "--input", str(missing)]
    assert report.main(args) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "Traceback" not in err
