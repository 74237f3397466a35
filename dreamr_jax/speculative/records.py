"""What a mode returns: the committed chain, the steps written or considered, and counters."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class StepRecord:
    """A step the engine wrote or considered. `committed` steps make up the output. With the
    `resume` fallback a step can come in two records: the target's part, up to its first token
    that differs from the rejected draft step, then the draft's continuation."""

    text: str
    author: str  # "draft" or "target"
    tokens: list[int]
    p: float | None = None  # CPN p (dreamr, lookahead) or score / 9 (specreason)
    accepted: bool | None = None  # for draft proposals
    committed: bool = True

    def to_json(self) -> dict:
        out = {"text": self.text, "author": self.author, "committed": self.committed}
        if self.p is not None:
            out["p"] = round(float(self.p), 6)
        if self.accepted is not None:
            out["accepted"] = bool(self.accepted)
        return out


@dataclasses.dataclass
class Solution:
    """A request's answer: the committed chain's tokens and its step records (committed or
    not), with the counters benchmarks and the summary report."""

    tokens: list[int]
    steps: list[StepRecord]
    proposed: int = 0  # draft steps (tokens for sd) put to the target
    accepted: int = 0
    target_calls: int = 0  # target forward launches (verification passes, step loops)
    format_misses: int = 0  # CPN verdicts below the format floor
    latency_s: float = 0.0
