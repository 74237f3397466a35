"""Training metrics to TensorBoard event files and a JSONL file side by side."""

from __future__ import annotations

import json
import os

from tensorboardX import SummaryWriter

from dreamr_jax.parallel.distributed import is_primary


class MetricsWriter:
    """Writes in process 0 only: the other processes of a multi-host run hold the same values."""

    def __init__(self, directory: str):
        self._on = is_primary()
        if not self._on:
            return
        os.makedirs(directory, exist_ok=True)
        self._tb = SummaryWriter(directory)
        self._jsonl = open(os.path.join(directory, "metrics.jsonl"), "a")  # noqa: SIM115

    def write(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
        if not self._on:
            return
        record = {"step": int(step)}
        for key, value in metrics.items():
            name = f"{prefix}/{key}"
            record[name] = float(value)
            self._tb.add_scalar(name, float(value), int(step))
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        if not self._on:
            return
        self._tb.close()
        self._jsonl.close()
