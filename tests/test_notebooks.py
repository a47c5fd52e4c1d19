"""The three teaching notebooks: committed executed, and still running top to bottom.

The structural tests need no data: each committed .ipynb holds exactly the cells that
notebooks/make_notebooks.py writes, every code cell executed once, in order, without an error.
The execution tests (real MNIST under FAIRDIFF_DATA) run 01 → 02 → 03 with nbclient + ipykernel on
the CPU, sharing one fresh run folder through FAIRDIFF_RUNS as a student would: the first notebook
trains the tiny autoencoder and base model, the other two reuse them by config hash. A notebook that
breaks fails here, and so does one whose displayed table is not the report it wrote.
"""
import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))                      # the repo's flat modules without installing
sys.path.insert(0, str(REPO / "notebooks"))
import data  # noqa: E402
import make_notebooks  # noqa: E402

NAMES = list(make_notebooks.NOTEBOOKS)             # in the order a student runs them
REAL_ROOT = os.environ.get("FAIRDIFF_DATA", "")
HAVE_MNIST = bool(REAL_ROOT) and all(
    (Path(REAL_ROOT) / "MNIST" / "raw" / f).exists() or (Path(REAL_ROOT) / "MNIST" / "raw" / f"{f}.gz").exists()
    for f in data.MNIST_FILES)
MAX_BYTES = 2_000_000


def images(nb) -> int:
    return sum("image/png" in o.get("data", {}) or "image/jpeg" in o.get("data", {})
               for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def errors(nb) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]


# ------------------------------------------------------------------------------- committed files
@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_is_the_generated_cells_executed_in_order(name):
    path = REPO / "notebooks" / name
    assert path.stat().st_size < MAX_BYTES, f"{name} is {path.stat().st_size / 1e6:.1f} MB"
    nb = nbformat.read(path, as_version=4)
    expected = make_notebooks.NOTEBOOKS[name]
    assert [(c.cell_type, c.source) for c in nb.cells] == [(c.cell_type, c.source) for c in expected], \
        f"{name} differs from notebooks/make_notebooks.py; regenerate it with --execute"
    counts = [c.execution_count for c in nb.cells if c.cell_type == "code"]
    assert counts == list(range(1, len(counts) + 1)), f"{name} was not executed top to bottom: {counts}"
    assert not errors(nb) and images(nb) >= 3
    assert nb.cells[0].cell_type == "markdown"


@pytest.mark.parametrize("name", NAMES)
def test_every_equation_comes_before_the_cell_that_computes_it(name):
    """Each section opens with markdown: no two code cells in a row without an explanation between."""
    kinds = [c.cell_type for c in make_notebooks.NOTEBOOKS[name]]
    assert kinds[0] == "markdown" and kinds[1] == "code"           # the title, then the setup cell
    assert all(not (a == b == "code") for a, b in zip(kinds[2:], kinds[3:]))


# --------------------------------------------------------------------------------------- execution
@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """Run the three notebooks in order in one fresh run folder: {name: notebook or the exception}."""
    if not HAVE_MNIST:
        pytest.skip("real MNIST not found: set FAIRDIFF_DATA to the data root (the notebooks train on it)")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    runs = tmp_path_factory.mktemp("notebook-runs")
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}   # the notebooks pick the inline backend
    env["FAIRDIFF_RUNS"] = str(runs)
    out = {}
    for name in NAMES:
        nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
        client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                         resources={"metadata": {"path": str(REPO)}})
        try:
            client.execute(env=env)
            out[name] = nb
        except Exception as e:   # keep going: the later notebooks train what they miss themselves
            out[name] = e
    return out, runs / "cmnist"


def run(executed, name):
    notebooks, folder = executed
    if isinstance(notebooks[name], Exception):
        raise notebooks[name]
    nb = notebooks[name]
    assert not errors(nb) and images(nb) >= 3              # plots inline
    return nb, folder


def outputs_text(nb, mime="text/markdown") -> str:
    return "\n".join(o.get("text", "") if o.output_type == "stream" else o.get("data", {}).get(mime, "")
                     for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_notebook_01_trains_the_tiny_pipeline(executed):
    nb, folder = run(executed, "01_latent_diffusion.ipynb")
    (base,) = folder.glob("base-*")                        # one base model, trained by the notebook
    log = [json.loads(line) for line in (base / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(10, 301, 10))   # the notebook's log_every=10 reached train()
    assert log[-1]["loss"] < 0.5 * log[0]["loss"]
    assert "DDPM 1000 steps" in outputs_text(nb) and "DDIM   10 steps" in outputs_text(nb)


def test_notebook_02_shows_the_sweep_it_wrote(executed):
    nb, folder = run(executed, "02_ddm.ipynb")
    assert len(list(folder.glob("base-*"))) == 1           # reused notebook 1's model, trained nothing new
    report = folder / "ddm-biased-base"
    metrics = json.loads((report / "metrics.json").read_text())
    for scenario in ("fd", "spd"):
        rows = metrics["scenarios"][scenario]["rows"]
        assert {(r["kind"], r["alpha"]) for r in rows} == {("ddm", 0.0), ("ddm", 0.5), ("adversarial", 0.5)}
        assert all(r["seeds"] == [0, 1] for r in rows)      # every arm at both seeds
    verdicts = metrics["scenarios"]["fd"]["verdicts"]
    text = outputs_text(nb, "text/plain")
    assert all(f"{v['kind']:11s} CFG {v['scale']:g}: {'lowers' if v['lowers'] else 'does not lower'} FD" in text
               for v in verdicts)                           # the verdicts shown are the report's own
    assert (report / "tradeoff.png").exists() and list((report / "grids").glob("fd_*.png"))
    assert nb.cells[-1].outputs                                # the committed GPU results, or "none yet"


def test_notebook_03_runs_every_invdiff_arm_on_the_frozen_model(executed):
    nb, folder = run(executed, "03_invdiff.ipynb")
    assert len(list(folder.glob("base-*"))) == 1
    metrics = json.loads((folder / "invdiff" / "metrics.json").read_text())
    assert [a["name"] for a in metrics["arms"]] == ["base", "invdiff", "lambda0", "random", "oracle"]
    assert all(a["n"] == 10 * 40 for a in metrics["arms"])     # the notebook's 40 samples per digit
    import evaluate
    assert evaluate.format_table(metrics) in outputs_text(nb)
    assert nb.cells[-1].outputs                                # the committed GPU results, or "none yet"
