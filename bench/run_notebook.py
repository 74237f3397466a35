"""Runs a notebook top to bottom as Colab would, on this machine's CPU, and records its time.

    pip install -e '.[notebook]'
    python bench/run_notebook.py notebooks/quickstart.ipynb [--out runs/notebook/executed.ipynb]

Executes every cell in order with nbclient (a cell that raises stops the run: exit 1, naming
the cell), from the repository root, and writes the executed copy (outputs included) to --out.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebook", type=Path)
    parser.add_argument("--out", type=Path, default=REPO / "runs/notebook/executed.ipynb")
    parser.add_argument("--timeout", type=int, default=900, help="seconds a cell may take")
    args = parser.parse_args()
    notebook = nbformat.read(args.notebook, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=args.timeout,
        kernel_name="python3",
        resources={"metadata": {"path": REPO}},
    )
    began = time.perf_counter()
    try:
        client.execute()
        failed = None
    except CellExecutionError as e:
        failed = e
    seconds = time.perf_counter() - began
    args.out.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(notebook, args.out)
    if failed is not None:
        print(f"{args.notebook}: a cell failed after {seconds:.0f} s:\n{failed}", file=sys.stderr)
        return 1
    cells = sum(c.cell_type == "code" for c in notebook.cells)
    print(f"{args.notebook}: {cells} code cells ran without error in {seconds:.0f} s ({args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
