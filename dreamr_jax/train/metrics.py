"""Training metrics to TensorBoard event files and a JSONL file side by side."""

from __future__ import annotations

import json
import os

from tensorboardX import SummaryWriter


class MetricsWriter:
    def __init__(self, directory: str):
        os.makedirs(directory, exist_ok=True)
        self._tb = SummaryWriter(directory)
        self._jsonl = open(os.path.join(directory, "metrics.jsonl"), "a")  # noqa: SIM115

    def write(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
        record = {"step": int(step)}
        for key, value in metrics.items():
            name = f"{prefix}/{key}"
            record[name] = float(value)
            self._tb.add_scalar(name, float(value), int(step))
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        self._tb.close()
        self._jsonl.close()
