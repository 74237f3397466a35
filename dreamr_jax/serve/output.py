"""The output file of serve.py: its lock, reading it back whatever happened to it, the settings
its records came from, and the summary over them.

Each output line is one record (`id`, then either `error` or the answer's fields) stamped with
the settings that produced it. A run holds `<output>.lock` for its whole life; it reads the file
back first, moves every line it cannot use (torn by a kill, edited by hand, a second copy of an
id) to `<output>.damaged`, so that those ids are answered again and every id appears once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import re
from collections import Counter
from pathlib import Path

from dreamr_jax.config.schema import ServeConfig
from dreamr_jax.serve.checkpoints import DEFAULT_DRAFT, DEFAULT_TARGET

# The numbers every answered record carries; a record without them cannot be summarised.
COUNTS = ("latency_s", "new_tokens", "proposed", "accepted", "target_calls")
# The id of a line too damaged to parse, where its start survived (for the report only: every
# input id missing from the usable records is answered again anyway)
_ID_OF_DAMAGED = re.compile(rb'^\{"id": ("(?:[^"\\]|\\.)*")')


class OutputInUseError(RuntimeError):
    """Another run holds the output's lock."""


class MixedSettingsError(ValueError):
    """The output holds records made with other settings than this run's."""


class OutputLock:
    """An exclusive lock on an output file for as long as the `with` block runs.

    `flock` on `<output>.lock`, which also holds the holder's pid: the kernel drops the lock
    when its process dies, so a killed run leaves a stale file, never a stale lock."""

    def __init__(self, output: str | os.PathLike):
        self.output = os.fspath(output)
        self.path = self.output + ".lock"
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                raise OutputInUseError(
                    f"output {self.output} is being written by another serve.py run (pid "
                    f"{holder}, lock {self.path}); wait for it to end or choose another output"
                ) from None
            # The last holder unlinks the file on release: a lock taken on a file that is no
            # longer at the path guards nothing, so try again with the one there now.
            try:
                current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        os.unlink(self.path)  # still ours: nobody else can hold it
        os.close(self._fd)
        self._fd = None


# ----------------------------------------------------------------------------- reading back


@dataclasses.dataclass
class OutputFile:
    """What an output file holds: usable records by id (file order), and what was moved out."""

    records: dict[str, dict]
    damaged: list[str]  # one description a line moved to `<output>.damaged`


def _unusable(record: object, seen: dict[str, int]) -> str | None:
    """Why a parsed line cannot count as its id's record, or None."""
    if not isinstance(record, dict):
        return "not a JSON object"
    rid = record.get("id")
    if not isinstance(rid, str) or not rid:
        return "no string 'id'"
    if rid in seen:
        return f"id {rid!r} again (first on line {seen[rid]})"
    if "error" in record:
        return None if isinstance(record["error"], str) else "field 'error' is not a string"
    for key in COUNTS:
        value = record.get(key)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            return f"field {key!r} is missing or not a number"
    if not isinstance(record.get("correct", False), bool):
        return "field 'correct' is not true or false"
    return None


def _id_of(raw: bytes, record: object) -> str:
    rid = record.get("id") if isinstance(record, dict) else None
    if rid is None and (match := _ID_OF_DAMAGED.match(raw)):
        with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError):
            rid = json.loads(match.group(1))
    return f" (id {rid!r})" if isinstance(rid, str) else ""


def recover_output(path: str | os.PathLike) -> OutputFile:
    """Reads an output file back; lines it cannot use are moved to `<path>.damaged` and the file
    is rewritten without them (atomically), so their ids get answered again. Call it under the
    output's lock."""
    path = Path(path)
    if not path.exists():
        return OutputFile({}, [])
    lines = path.read_bytes().split(b"\n")
    records, kept, moved, damaged = {}, [], [], []
    seen: dict[str, int] = {}
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
            why = _unusable(record, seen)
        except (json.JSONDecodeError, UnicodeDecodeError):
            record, why = None, "not valid JSON"
        if number == len(lines) and why == "not valid JSON":
            why = "cut off (the run was killed while writing it)"
        if why is None:
            records[record["id"]] = record
            seen[record["id"]] = number
            kept.append(raw)
        else:
            moved.append(raw)
            damaged.append(f"line {number}{_id_of(raw, record)}: {why}")
    if moved:
        with open(f"{path}.damaged", "ab") as f:
            f.write(b"".join(raw + b"\n" for raw in moved))
        temporary = path.with_name(path.name + ".rewrite")
        temporary.write_bytes(b"".join(raw + b"\n" for raw in kept))
        os.replace(temporary, path)
    return OutputFile(records, damaged)


# ----------------------------------------------------------------------------- settings


def run_settings(cfg: ServeConfig) -> dict:
    """What decides a record's answer (mode and its knobs, models, prompt format, seed), as the
    plain JSON every output line carries."""

    def model(ref, default) -> dict:
        return {"path": os.path.abspath(ref.path or default), "dtype": ref.dtype}

    settings = {
        "spec": dataclasses.asdict(cfg.spec),
        "target": model(cfg.target, DEFAULT_TARGET),
        "draft": None if cfg.spec.mode == "target" else model(cfg.draft, DEFAULT_DRAFT),
        "prompt": dataclasses.asdict(cfg.prompt),
        "seed": cfg.seed,
    }
    return json.loads(json.dumps(settings))  # tuples as lists, as they read back


def _flatten(tree: object, prefix: str = "") -> dict[str, object]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else key))
    return flat


def settings_difference(theirs: dict | None, ours: dict) -> str:
    """The keys where two settings differ, for a message."""
    if theirs is None:
        return "records without settings, written by an older serve.py"
    a, b = _flatten(theirs), _flatten(ours)
    keys = [k for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
    shown = "; ".join(f"{k}: {a.get(k)!r} there, {b.get(k)!r} now" for k in keys[:3])
    return shown + (f"; {len(keys) - 3} more" if len(keys) > 3 else "")


def check_settings(output: OutputFile, settings: dict, path: str, allow_mixed: bool) -> None:
    """Refuses to add this run's records to a file holding records of other settings."""
    others = [r for r in output.records.values() if r.get("settings") != settings]
    if others and not allow_mixed:
        raise MixedSettingsError(
            f"output {path} holds {len(others)} records made with other settings "
            f"({settings_difference(others[0].get('settings'), settings)}); choose another "
            "output, or set allow_mixed_settings=true to add to it anyway"
        )


# ----------------------------------------------------------------------------- summary


def summarize(records: list[dict], **extra) -> dict:
    """Accuracy, latency, acceptance and counts over usable records (`recover_output`'s), and
    the settings that produced them: one mapping, or a list of them with their record counts
    when the file mixes settings."""
    ok = [r for r in records if "error" not in r]
    graded = [r for r in ok if "correct" in r]
    proposed = sum(r["proposed"] for r in ok)
    latencies = [r["latency_s"] for r in ok]
    groups = Counter(json.dumps(r.get("settings"), sort_keys=True) for r in records)
    if len(groups) == 1:
        settings = json.loads(next(iter(groups)))
        mode = settings["spec"]["mode"] if settings else None
    else:
        settings = [{"records": n, "settings": json.loads(s)} for s, n in groups.most_common()]
        mode = "mixed" if groups else None
    return {
        "mode": mode,
        "n": len(records),
        "n_errors": len(records) - len(ok),
        "n_graded": len(graded),
        "accuracy": sum(r["correct"] for r in graded) / len(graded) if graded else None,
        "mean_latency_s": sum(latencies) / len(latencies) if latencies else None,
        "total_time_s": sum(latencies),
        **extra,
        "acceptance_rate": sum(r["accepted"] for r in ok) / proposed if proposed else None,
        "accepted_per_target_call": (
            sum(r["accepted"] for r in ok) / max(1, sum(r["target_calls"] for r in ok))
        ),
        "tokens_per_s": sum(r["new_tokens"] for r in ok) / max(sum(latencies), 1e-9),
        "settings": settings,
    }


def write_summary(path: str | os.PathLike, summary: dict) -> None:
    with open(f"{os.fspath(path)}.summary.json", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
