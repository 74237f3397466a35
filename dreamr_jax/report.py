"""A self-contained HTML report of a serve.py run: a picture of every answer.

    python -m dreamr_jax.report OUT.jsonl [--input IN.jsonl] [--out OUT.html]

On top, the run's summary (`<OUT>.summary.json`) and plots drawn as inline SVG; then every
record: its image(s) as data URIs, its question, its chain with each piece coloured by who
wrote it (draft steps the judge refused struck through, just before the target's text that
replaced them), the CPN p of every judged step, the latency, the prediction and the gold answer.
Images and questions come from the input file: `--input`, else the one the run's summary names,
else serve.py's own DigitMath input next to the output when it is there.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import shutil
import sys
import tempfile
from pathlib import Path

from dreamr_jax.config.schema import ServeDataConfig
from dreamr_jax.serve.output import OutputFile, recover_output, summarize
from dreamr_jax.serve.records import RecordError, image_paths, load_image, read_records

THUMBNAIL = 384  # longest side of an embedded image, in pixels: the report stays small
COLOURS = {"draft": "#2e8b57", "target": "#3465a4", "refused": "#c0392b"}
STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px}
.note{color:#555} .warn{background:#fff4e5;border-left:4px solid #e67e22;padding:6px 10px}
.summary{display:grid;grid-template-columns:repeat(4,max-content);gap:2px 36px}
.summary span{color:#555;margin-right:8px}
.plots{display:flex;flex-wrap:wrap;gap:18px} svg{background:#fafafa;border:1px solid #ddd}
.legend span{margin-right:14px}
.problem{border:1px solid #ccc;border-radius:6px;padding:8px 12px;margin:10px 0}
.problem.wrong{border-left:5px solid #c0392b} .problem.right{border-left:5px solid #2e8b57}
.problem.failed{border-left:5px solid #e67e22;background:#fffaf3}
.problem h3{margin:0;font-size:15px} .meta{color:#555;font-size:13px}
.body{display:flex;gap:14px;margin-top:6px} .images img{image-rendering:pixelated;
max-width:300px;min-width:120px;border:1px solid #bbb;display:block;margin-bottom:4px}
.question{font-weight:600;margin:0 0 6px} .chain{white-space:pre-wrap;font-family:monospace}
.draft{background:#dff3e6;color:#1d5e3a} .target{background:#dde7f5;color:#23467a}
.refused{color:#c0392b;text-decoration:line-through;opacity:.75}
sup.p{font:10px monospace;padding:0 2px;border-radius:3px;background:#eee;color:#1d5e3a}
sup.p.no{color:#c0392b} .error{color:#b03a2e;font-family:monospace;white-space:pre-wrap}
"""


class ReportError(Exception):
    """A file the report needs cannot be read or written; main() prints it and exits 2."""


# ----------------------------------------------------------------------------- reading


def read_output(path: Path) -> OutputFile:
    """The usable records of a serve.py output and a description of every line that is not.

    `recover_output` is serve.py's own reading (so the report counts and describes lines as
    the next run would), but it repairs the file in place; it reads a copy here, so that the
    report never changes the run it reports on."""
    if not path.is_file():
        raise ReportError(f"{path}: no such file" + (" (a folder)" if path.is_dir() else ""))
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / path.name
        try:
            shutil.copyfile(path, copy)
        except OSError as e:
            raise ReportError(f"{path}: cannot read it ({e.strerror or e})") from None
        return recover_output(copy)


def read_summary(output: Path, records: list[dict]) -> tuple[dict, str]:
    """The run's summary and where it came from: `<output>.summary.json`, or the records (with
    serve.py's `summarize`) when that file is missing or unreadable."""
    path = Path(f"{output}.summary.json")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(summary, dict):
            return summary, str(path)
        why = f"{path} is not a JSON object"
    except FileNotFoundError:
        why = "no summary file"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        why = f"{path} is unreadable ({e})"
    return summarize(records), f"computed from the records ({why})"


def read_inputs(path: Path) -> dict[str, dict | None]:
    """The input records by id (serve.py's ids), None for a line serve.py could not use."""
    try:
        return {item.id: item.record for item in read_records(path)}
    except OSError as e:
        raise ReportError(f"{path}: cannot read it ({e.strerror or e})") from None


def image_uris(record: dict, folder: Path) -> list[str]:
    """The record's images as PNG data URIs, shrunk to THUMBNAIL; an image that cannot be shown
    becomes its error message instead (serve.py's own checks and words)."""
    try:
        paths = image_paths(record, ServeDataConfig.max_images)
    except RecordError as e:
        return [str(e)]
    shown = []
    for name in paths:
        try:
            image = load_image(folder, name, ServeDataConfig.max_image_pixels)
        except RecordError as e:
            shown.append(str(e))
            continue
        image.thumbnail((THUMBNAIL, THUMBNAIL))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        shown.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
    return shown


# ----------------------------------------------------------------------------- plots

# Every plot's box: its size, and the margins left for the axis labels and the title
WIDTH, HEIGHT, LEFT, TOP, BOTTOM = 372, 220, 36, 28, 40
PLOT_W, PLOT_H = WIDTH - LEFT - 12, HEIGHT - TOP - BOTTOM


def _svg(title: str, xlabel: str, top_label: str, body: list[str]) -> str:
    """A plot's SVG: its title, x axis with `xlabel`, the y value at the top, and `body`."""
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}">'
        f'<text x="{WIDTH / 2}" y="16" text-anchor="middle" font-weight="600">'
        f"{html.escape(title)}</text>"
        f'<line x1="{LEFT}" y1="{TOP + PLOT_H}" x2="{LEFT + PLOT_W}" y2="{TOP + PLOT_H}" '
        'stroke="#333"/>'
        f'<text x="{LEFT - 4}" y="{TOP + 8}" text-anchor="end" font-size="11">{top_label}</text>'
        f'<text x="{LEFT + PLOT_W / 2}" y="{HEIGHT - 8}" text-anchor="middle" font-size="12">'
        f"{html.escape(xlabel)}</text>" + "".join(body) + "</svg>"
    )


def histogram_svg(title, series, lo, hi, xlabel, marker=None, bins=20) -> str:
    """Counts of each series' values in `bins` equal bins over [lo, hi], the series' bars side
    by side in each bin; `series` is [(label, values, colour)], `marker` an x to draw dashed."""
    span = (hi - lo) or 1.0
    counts = [[0] * bins for _ in series]
    for row, (_, values, _) in zip(counts, series, strict=True):
        for v in values:
            row[min(bins - 1, max(0, int((v - lo) / span * bins)))] += 1
    most = max((max(row) for row in counts), default=0) or 1
    bar = PLOT_W / bins / len(series)
    body = []
    for s, (row, (label, _, colour)) in enumerate(zip(counts, series, strict=True)):
        for b, n in enumerate(row):
            h, x = n / most * PLOT_H, LEFT + b * PLOT_W / bins + s * bar
            if n:
                body.append(
                    f'<rect x="{x:.1f}" y="{TOP + PLOT_H - h:.1f}" width="{bar:.1f}" '
                    f'height="{h:.1f}" fill="{colour}"><title>{html.escape(label)}: {n}</title>'
                    "</rect>"
                )
    for frac in (0, 0.5, 1):
        body.append(
            f'<text x="{LEFT + frac * PLOT_W}" y="{TOP + PLOT_H + 14}" text-anchor="middle" '
            f'font-size="11">{lo + frac * span:.3g}</text>'
        )
    if marker is not None and lo <= marker <= hi:
        x = LEFT + (marker - lo) / span * PLOT_W
        body.append(
            f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{TOP + PLOT_H}" stroke="#000" '
            f'stroke-dasharray="4 3"/><text x="{x - 3:.1f}" y="{TOP + 10}" font-size="11" '
            f'text-anchor="end">alpha {marker:g}</text>'
        )
    if len(series) > 1:
        for s, (label, values, colour) in enumerate(series):
            body.append(
                f'<text x="{LEFT + 8}" y="{TOP + 14 + 14 * s}" font-size="11" fill="{colour}">'
                f"\u25a0 {html.escape(label)} ({len(values)})</text>"
            )
    return _svg(title, xlabel, str(most), body)


def share_svg(shares: list[tuple[str, float]]) -> str:
    """One bar per problem: the share of its committed text the draft wrote, each bar a link
    to the problem."""
    bar = PLOT_W / max(1, len(shares))
    body = [f'<text x="{LEFT - 4}" y="{TOP + PLOT_H}" text-anchor="end" font-size="11">0</text>']
    for i, (rid, share) in enumerate(shares):
        h = share * PLOT_H
        body.append(
            f'<a href="#p-{html.escape(rid)}"><rect x="{LEFT + i * bar + bar * 0.1:.1f}" '
            f'y="{TOP + PLOT_H - h:.1f}" width="{bar * 0.8:.1f}" height="{h:.1f}" '
            f'fill="{COLOURS["draft"]}"><title>{html.escape(rid)}: {share:.0%}</title></rect></a>'
        )
    return _svg(
        "share of the committed text the draft wrote",
        f"problems, in output order ({len(shares)})",
        "100%",
        body,
    )


# ----------------------------------------------------------------------------- rendering


def steps_of(record: dict) -> list[dict]:
    """The record's step records as `{"text", "kind", "p", "accepted"}`, kind being the author
    of a committed step or "refused"; pieces a hand-edited line got wrong are left out or
    blank rather than stopping the report (serve.py checks the counters, not the steps)."""
    steps = record.get("steps")
    out = []
    for step in steps if isinstance(steps, list) else []:
        if not isinstance(step, dict):
            continue
        p = step.get("p")
        out.append(
            {
                "text": str(step.get("text", "")),
                "kind": str(step.get("author")) if step.get("committed", True) else "refused",
                "p": p if isinstance(p, int | float) and 0 <= p <= 1 else None,
                "accepted": step.get("accepted"),
            }
        )
    return out


def draft_share(record: dict) -> float:
    """The fraction of the committed text written by the draft. By characters: step records
    carry their text, not their token counts."""
    committed = [s for s in steps_of(record) if s["kind"] != "refused"]
    total = sum(len(s["text"]) for s in committed)
    drafted = sum(len(s["text"]) for s in committed if s["kind"] == "draft")
    return drafted / total if total else 0.0


def render_chain(steps: list[dict]) -> str:
    """The chain as one flowing text: committed pieces coloured by author, refused drafts struck
    through (their step breaks shown as \u00b6, so the chain's layout stays the committed one's)
    just before the target's replacement, each judged piece followed by its CPN p."""
    out = []
    for step in steps:
        kind, text = step["kind"], step["text"]
        if kind == "refused":
            text = text.replace("\n\n", "\u00b6").replace("\n", "\u21b5")
        tip = kind if kind == "refused" else f"{kind}, committed"
        badge = ""
        if step["p"] is not None:
            tip += f", CPN p = {step['p']:.3f}"
            no = " no" if step["accepted"] is False else ""
            badge = f'<sup class="p{no}">{step["p"]:.3f}</sup>'
        body = html.escape(text.rstrip("\n"))
        out.append(
            f'<span class="{html.escape(kind)}" title="{html.escape(tip)}">{body}</span>{badge}'
        )
        out.append(html.escape(text[len(text.rstrip("\n")) :]))
    return "".join(out)


def render_problem(record: dict, source: dict | None, folder: Path | None) -> str:
    """One record's card: images, question, chain, numbers; or its error."""
    rid = record["id"]
    error = record.get("error")
    if error is not None:
        state, mark = "failed", "error"
    elif "correct" in record:
        state, mark = (
            ("right", "\u2713 correct") if record["correct"] else ("wrong", "\u2717 wrong")
        )
    else:
        state, mark = "", "no gold answer"
    parts = [f'<section class="problem {state}" id="p-{html.escape(rid)}">']
    parts.append(f"<h3>{html.escape(rid)} &mdash; {mark}</h3>")
    if error is None:
        gold = record.get("answer")
        parts.append(
            f'<div class="meta">prediction <b>{_show(record.get("prediction"))}</b>'
            f" &middot; gold <b>{_show(gold)}</b> &middot; "
            f"{record['latency_s'] * 1000:.1f} ms &middot; {record['new_tokens']} tokens &middot;"
            f" {record['accepted']}/{record['proposed']} drafts accepted &middot; "
            f"{record['target_calls']} target calls &middot; "
            f"draft wrote {draft_share(record):.0%} of the text</div>"
        )
    images, question = "", ""
    if source is not None:
        for uri in image_uris(source, folder):
            images += (
                f'<img src="{uri}" alt="{html.escape(rid)}">'
                if uri.startswith("data:")
                else f'<p class="error">{html.escape(uri)}</p>'
            )
        question = html.escape(str(source.get("question", "")))
    body = f'<p class="question">{question}</p>' if question else ""
    if error is not None:
        body += f'<p class="error">{html.escape(error)}</p>'
    else:
        body += f'<div class="chain">{render_chain(steps_of(record))}</div>'
    parts.append(f'<div class="body"><div class="images">{images}</div><div>{body}</div></div>')
    return "".join(parts) + "</section>"


def _show(value, key: str = "") -> str:
    if isinstance(value, float):
        return f"{value:.1%}" if key in ("accuracy", "acceptance_rate") else f"{value:.4g}"
    return html.escape("\u2014" if value is None else str(value))


def render_report(
    output: Path,
    read: OutputFile,
    inputs: dict[str, dict | None],
    input_path: Path | None,
    input_from: str = "",
) -> str:
    """The whole HTML page for `read`, the records of the output file at `output`; `inputs`
    are the records of `input_path`, and `input_from` says where its name came from when the
    user did not give it."""
    records = list(read.records.values())
    summary, summary_from = read_summary(output, records)
    settings = summary.get("settings")
    spec = settings.get("spec") if isinstance(settings, dict) else None
    alpha = spec.get("alpha") if isinstance(spec, dict) else None  # none for mixed settings
    rows = "".join(
        f"<div><span>{html.escape(k)}</span><b>{_show(v, k)}</b></div>"
        for k, v in summary.items()
        if not isinstance(v, dict | list)
    )
    answered = [r for r in records if "error" not in r]
    judged = [s for r in answered for s in steps_of(r) if s["p"] is not None]
    plots = [
        histogram_svg(
            "latency per problem",
            [("problems", [r["latency_s"] * 1000 for r in answered], "#3465a4")],
            0,
            max((r["latency_s"] * 1000 for r in answered), default=1),
            "ms",
        ),
        share_svg([(r["id"], draft_share(r)) for r in answered]),
        histogram_svg(
            "CPN p of the judged draft steps",
            [
                ("accepted", [s["p"] for s in judged if s["accepted"]], COLOURS["draft"]),
                ("refused", [s["p"] for s in judged if not s["accepted"]], COLOURS["refused"]),
            ],
            0.0,
            1.0,
            "p",
            marker=alpha if isinstance(alpha, int | float) else None,
        ),
    ]
    notes = []
    if input_path is None:
        notes.append("No input file: pass --input IN.jsonl to see the images and questions.")
    else:
        missing = sum(1 for r in records if r["id"] not in inputs)
        notes.append(
            f"Input: {html.escape(str(input_path))} ({len(inputs)} records"
            + (f"; {missing} ids of the output are not in it" if missing else "")
            + (f"; {html.escape(input_from)}" if input_from else "")
            + ")."
        )
    if summary.get("n") not in (None, len(records)):
        notes.append(f"The summary counts {summary['n']} records, the file holds {len(records)}.")
    warn = ""
    if read.damaged:
        lines = "".join(f"<li>{html.escape(d)}</li>" for d in read.damaged)
        warn = (
            f'<div class="warn"><b>{len(read.damaged)} unreadable line(s)</b> in '
            f"{html.escape(str(output))} (serve.py moves them to .damaged and answers their ids "
            f"again on its next run):<ul>{lines}</ul></div>"
        )
    folder = input_path.parent if input_path else None
    problems = "".join(render_problem(r, inputs.get(r["id"]), folder) for r in records)
    legend = "".join(
        f'<span class="{k}">{label}</span>'
        for k, label in [
            ("draft", "draft, accepted"),
            ("target", "target"),
            ("refused", "draft, refused (the target took over)"),
        ]
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>Report: "
        f"{html.escape(output.name)}</title><style>{STYLE}</style></head><body>"
        f"<h1>serve.py report: {html.escape(str(output))}</h1>"
        f'<p class="note">{" ".join(notes)} Summary: {html.escape(summary_from)}.</p>{warn}'
        f'<h2>Summary</h2><div class="summary">{rows}</div>'
        f"<details><summary>settings</summary><pre>{html.escape(json.dumps(settings, indent=2))}"
        f'</pre></details><h2>Plots</h2><div class="plots">{"".join(plots)}</div>'
        f'<h2>Answers ({len(records)})</h2><p class="legend">{legend} '
        f'<sup class="p">0.987</sup> CPN p of a judged step</p>{problems}</body></html>'
    )


# ----------------------------------------------------------------------------- entry point


def default_input(output: Path) -> tuple[Path | None, str]:
    """The input a run answered when --input names none, and where that came from: the file
    its summary names (serve.py records it), else serve.py's own DigitMath input next to the
    output (`serve/main.py`'s `default_input`) if it is there, a guess that holds for the
    default run only."""
    try:
        named = json.loads(Path(f"{output}.summary.json").read_text(encoding="utf-8"))["input"]
        if Path(named).is_file():
            return Path(named), "named by the run's summary"
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no summary, or one from before serve.py recorded its input
    path = output.resolve().parent / "digitmath-test" / "test.jsonl"
    if path.is_file():
        guess = "serve.py's default input next to the output; pass --input if the run read another"
        return path, guess
    return None, ""


def main(argv: list[str] | None = None) -> int:
    """Writes the report; 2 with a message (no traceback) when a needed file is unreadable."""
    parser = argparse.ArgumentParser(prog="python -m dreamr_jax.report", description=__doc__)
    parser.add_argument("output", type=Path, help="serve.py's output JSONL")
    parser.add_argument("--input", type=Path, help="the input JSONL the run answered")
    parser.add_argument("--out", type=Path, help="the HTML file (default: OUTPUT with .html)")
    args = parser.parse_args(argv)
    try:
        read = read_output(args.output)
        for line in read.damaged:  # listed in the report too; not fatal
            print(f"report: warning: {args.output}: {line}", file=sys.stderr)
        if args.input is not None and not args.input.is_file():
            raise ReportError(f"{args.input}: no such input file")
        input_path, input_from = (args.input, "") if args.input else default_input(args.output)
        inputs = read_inputs(input_path) if input_path else {}
        page = render_report(args.output, read, inputs, input_path, input_from)
        out = args.out or args.output.with_suffix(".html")
        try:
            out.write_text(page, encoding="utf-8")
        except OSError as e:
            raise ReportError(f"{out}: cannot write the report ({e.strerror or e})") from None
    except ReportError as e:
        print(f"report: error: {e}", file=sys.stderr)
        return 2
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
