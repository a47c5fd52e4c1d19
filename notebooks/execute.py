"""Runs the teaching notebooks top to bottom on the CPU and writes each .ipynb with its outputs.

    python notebooks/execute.py                      # all three, in order, sharing run folder runs/
    python notebooks/execute.py --runs DIR 03_invdiff.py

The source of each notebook is its jupytext percent file, notebooks/NN_<name>.py. This script reads
that file, executes it with nbclient from the repository root (FAIRDIFF_RUNS=DIR, so notebook 2 reuses
the models notebook 1 trained there) and writes the paired NN_<name>.ipynb. tests/test_notebooks.py
runs the same function in a fresh run folder.
"""
import argparse
import os
import time
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SOURCES = sorted(HERE.glob("[0-9][0-9]_*.py"))         # in the order a student runs them


def execute(source: Path, runs) -> nbformat.NotebookNode:
    """The notebook of one percent source, executed top to bottom with FAIRDIFF_RUNS=runs."""
    nb = jupytext.read(source)
    for i, cell in enumerate(nb.cells):          # stable ids: executing again changes only the outputs
        cell.id = f"cell-{i}"
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}   # the notebooks pick the inline backend
    env["FAIRDIFF_RUNS"] = str(runs)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}},
                            coalesce_streams=True, record_timing=False)   # progress bars: their final state
    client.execute(env=env)
    return nb


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help="sources to run (default: all, in order), e.g. 03_invdiff.py")
    p.add_argument("--runs", default="runs", help="run folder shared by the notebooks ($FAIRDIFF_RUNS)")
    args = p.parse_args()
    sources = [HERE / Path(name).name for name in args.names] or SOURCES
    for source in sources:
        start = time.perf_counter()
        nb = execute(source, Path(args.runs).resolve())
        path = source.with_suffix(".ipynb")
        jupytext.write(nb, path)
        print(f"{path.name}: executed in {time.perf_counter() - start:.0f} s, {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
