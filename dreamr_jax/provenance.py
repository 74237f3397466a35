"""Where a result came from: the commit and the command, recorded beside trained weights and
calibrations so that each can be reproduced."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=_REPO, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def provenance() -> dict:
    """`commit` (None outside a git checkout), `dirty` (tracked files changed since it: the
    commit alone does not reproduce the result) and `command` (this process's command line)."""
    commit = _git("rev-parse", "HEAD")
    changed = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": commit,
        "dirty": bool(changed) if commit else None,
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
    }
