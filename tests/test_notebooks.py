"""The three teaching notebooks: written as jupytext percent files, committed executed, and still
running top to bottom.

The structural tests need no data: each committed .ipynb is paired with its source notebooks/NN_*.py and
holds exactly its cells (read with jupytext), every code cell executed once, in order, without an error,
and every section opens with markdown. The first code cell, whose work is notebooks/setup_notebook.py,
runs from notebooks/ as from the root, says what to do anywhere else, and installs the requirements into a
fresh Python before anything imports them. The execution tests (real MNIST under FAIRDIFF_DATA) run the
sources 01 → 02 → 03 with notebooks/execute.py (nbclient + ipykernel, CPU; in a background thread that
tests/conftest.py starts once collection is done), sharing one fresh run folder through FAIRDIFF_RUNS as
a student would: the first notebook trains the tiny autoencoder and base model, the second reuses them by
config hash, the third reuses the autoencoder and trains its own base model on spuriously colored digits.
A notebook that breaks fails here, and so does one whose displayed report is not the one it wrote.
"""
import ast
import atexit
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
jupytext = pytest.importorskip("jupytext")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))                      # the repo's flat modules without installing
sys.path.insert(0, str(REPO / "notebooks"))
import data  # noqa: E402
import execute  # noqa: E402

NAMES = [source.stem for source in execute.SOURCES]   # in the order a student runs them
REAL_ROOT = os.environ.get("FAIRDIFF_DATA", "")
HAVE_MNIST = bool(REAL_ROOT) and all(
    (Path(REAL_ROOT) / "MNIST" / "raw" / f).exists() or (Path(REAL_ROOT) / "MNIST" / "raw" / f"{f}.gz").exists()
    for f in data.MNIST_FILES)
MAX_BYTES = 2_000_000


def source_cells(name):
    return jupytext.read(REPO / "notebooks" / f"{name}.py").cells


def images(nb) -> int:
    return sum("image/png" in o.get("data", {}) or "image/jpeg" in o.get("data", {})
               for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def errors(nb) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]


# ------------------------------------------------------------------------------- committed files
def test_the_three_notebooks_are_there():
    assert NAMES == ["01_latent_diffusion", "02_ddm", "03_invdiff"]


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_is_its_source_executed_in_order(name):
    path = REPO / "notebooks" / f"{name}.ipynb"
    assert path.stat().st_size < MAX_BYTES, f"{path.name} is {path.stat().st_size / 1e6:.1f} MB"
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata.get("jupytext", {}).get("formats") == "ipynb,py:percent", f"{path.name} is not paired"
    assert [(c.cell_type, c.source) for c in nb.cells] == [(c.cell_type, c.source) for c in source_cells(name)], \
        f"{path.name} differs from {name}.py; run python notebooks/execute.py {name}.py"
    counts = [c.execution_count for c in nb.cells if c.cell_type == "code"]
    assert counts == list(range(1, len(counts) + 1)), f"{path.name} was not executed top to bottom: {counts}"
    assert not errors(nb) and images(nb) >= 3


@pytest.mark.parametrize("name", NAMES)
def test_every_equation_comes_before_the_cell_that_computes_it(name):
    """Each section opens with markdown: no two code cells in a row without an explanation between."""
    cells = source_cells(name)
    kinds = [c.cell_type for c in cells]
    assert kinds[0] == "markdown" and kinds[1] == "code"           # the title, then the setup cell
    assert all(not (a == b == "code") for a, b in zip(kinds[2:], kinds[3:]))


@pytest.mark.parametrize("name", NAMES)
def test_setup_cell_installs_the_requirements_before_importing_them(name):
    """A fresh hosted Python gets going from the first code cell: it calls setup_notebook.setup, which runs
    pip when a requirement is missing, before torch is imported."""
    setup = source_cells(name)[1].source
    assert "from setup_notebook import" in setup
    assert setup.index("setup(ROOT)") < setup.index("import torch")


def test_setup_notebook_imports_only_the_standard_library_before_installing(tmp_path, monkeypatch):
    """setup_notebook.py can be imported where torch is not installed yet, and its install step runs pip on
    requirements.txt exactly when one of the packages listed there cannot be imported."""
    import setup_notebook
    tree = ast.parse(Path(setup_notebook.__file__).read_text())
    imported = {alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in tree.body if isinstance(node, ast.ImportFrom)}
    assert {name.split(".")[0] for name in imported} <= sys.stdlib_module_names, imported

    calls = []
    monkeypatch.setattr(setup_notebook.subprocess, "check_call", calls.append)
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("numpy>=1.24\ntorch>=2.4\n")
    setup_notebook.install_requirements(tmp_path)
    assert calls == []                                       # all there: nothing installed
    requirements.write_text("numpy>=1.24\nno_such_package_for_fairdiff>=1.0\n")
    setup_notebook.install_requirements(tmp_path)
    assert calls == [[sys.executable, "-m", "pip", "install", "-q", "-r", str(requirements)]]


@pytest.mark.parametrize("name", NAMES)
def test_setup_cell_finds_the_root_from_notebooks_and_says_what_to_do_elsewhere(name, tmp_path):
    """Jupyter started in notebooks/ works as from the root (the execution tests start there); from a
    folder outside the repository the first cell stops with the instruction to open it from a clone."""
    code = re.sub(r"(?m)^%", "# %", source_cells(name)[1].source)   # line magics back to comments: plain Python
    env = {**os.environ, "MPLBACKEND": "Agg"}
    inside = subprocess.run([sys.executable, "-c", code], cwd=REPO / "notebooks", env=env,
                            capture_output=True, text=True)
    assert inside.returncode == 0, inside.stderr
    assert inside.stdout.startswith("preset tiny on cpu; data root ")
    assert f"run folders in {(REPO / os.environ.get('FAIRDIFF_RUNS', 'runs')).resolve()}" in inside.stdout
    outside = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert outside.returncode != 0
    assert (f"FileNotFoundError: no ddpm.py in {tmp_path} or its parent: clone the repository and open the "
            "notebook from it") in outside.stderr


# --------------------------------------------------------------------------------------- execution
def can_execute() -> bool:
    """Real MNIST and a Jupyter kernel are there: the notebooks train on the one in the other."""
    return HAVE_MNIST and all(importlib.util.find_spec(m) is not None for m in ("nbclient", "ipykernel"))


def execute_all(runs: Path) -> dict:
    """Run the three notebooks in order in one fresh run folder:
    {name: (notebook or the exception, the base-model folders after it)}."""
    out = {}
    for source in execute.SOURCES:
        try:
            nb = execute.execute(source, runs)
        except Exception as e:   # keep going: the later notebooks train what they miss themselves
            nb = e
        out[source.stem] = nb, sorted(p.name for p in (runs / "cmnist").glob("base-*"))
    return out


_execution = {}                  # "thread", "runs", "result": one execution per pytest run


def start_executing():
    """Start execute_all in a thread, once. The work happens in the notebooks' kernels (other processes),
    so the tests collected before these run meanwhile: tests/conftest.py calls this when collection has
    selected a test that uses `executed`, and the fixture waits for the thread."""
    if _execution or not can_execute():
        return
    runs = Path(tempfile.mkdtemp(prefix="notebook-runs-"))
    atexit.register(shutil.rmtree, runs, ignore_errors=True)

    def work():
        try:
            _execution["result"] = execute_all(runs)
        except BaseException as e:      # reported by the fixture, in the tests that need the notebooks
            _execution["result"] = e
    _execution.update(runs=runs, thread=threading.Thread(target=work, name="notebooks", daemon=True))
    _execution["thread"].start()


@pytest.fixture(scope="module")
def executed():
    """The three notebooks executed in order in one fresh run folder (started by start_executing, or
    here): ({name: (notebook or the exception, the base-model folders after it)}, the cmnist run folder)."""
    if not HAVE_MNIST:
        pytest.skip("real MNIST not found: set FAIRDIFF_DATA to the data root (the notebooks train on it)")
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    start_executing()
    _execution["thread"].join()
    result = _execution["result"]
    if isinstance(result, BaseException):
        raise result
    return result, _execution["runs"] / "cmnist"


def run(executed, name):
    notebooks, folder = executed
    nb, bases = notebooks[name]
    if isinstance(nb, Exception):
        raise nb
    assert not errors(nb) and images(nb) >= 3              # plots inline
    return nb, bases, folder


def outputs_text(nb, mime="text/markdown") -> str:
    return "\n".join(o.get("text", "") if o.output_type == "stream" else o.get("data", {}).get(mime, "")
                     for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_notebook_01_trains_the_tiny_pipeline(executed):
    nb, bases, folder = run(executed, "01_latent_diffusion")
    (base,) = bases                                        # one base model, trained by the notebook
    log = [json.loads(line) for line in (folder / base / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(10, 301, 10))   # the notebook's log_every=10 reached train()
    assert log[-1]["loss"] < 0.5 * log[0]["loss"]
    assert "DDPM 1000 steps" in outputs_text(nb) and "DDIM   10 steps" in outputs_text(nb)


def test_notebook_02_shows_the_sweep_it_wrote(executed):
    nb, bases, folder = run(executed, "02_ddm")
    assert bases == executed[0]["01_latent_diffusion"][1]   # reused notebook 1's model, trained nothing new
    (report,) = [p for p in folder.glob("ddm-biased-base-*") if (p / "metrics.json").exists()]   # not the arms' runs
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


def test_notebook_03_runs_every_invdiff_arm_on_its_frozen_model(executed):
    nb, bases, folder = run(executed, "03_invdiff")
    assert len(bases) == len(executed[0]["02_ddm"][1]) + 1   # its own base, on the spurious data
    assert len(list(folder.glob("vae-*"))) == 1               # and notebook 1's autoencoder
    summary = json.loads((folder / "invdiff-notebook" / "metrics.json").read_text())
    assert summary["config"]["spurious"] == 0.9 and summary["config"]["samples_per_class"] == 4
    (setting,) = summary["settings"]
    assert list(setting["arms"]) == ["base", "erm", "inferred λ=0", "inferred λ=1", "random λ=1",
                                     "oracle λ=0", "oracle λ=1"]
    assert all(arm["Bias"]["n"] == 2 for arm in setting["arms"].values())   # both seeds
    import invdiff_report
    text = outputs_text(nb, "text/plain")
    assert invdiff_report.environment_markdown(summary["environments"]) in text   # the table it wrote
    verdict = setting["verdict"]
    assert (f"**{'InvDiff reduces Bias' if verdict['reduces'] else 'InvDiff does not reduce Bias'}; "
            f"{'the invariance term helps' if verdict['helps'] else 'the invariance term does not help'}.**") in text
    walkthrough = [json.loads(line) for line in next(folder.glob("invdiff-walkthrough-*/log.jsonl")).open()]
    assert len(walkthrough[-1]["arm_loss"]) == 6 and walkthrough[-1]["step"] == 40   # the first seed's arms
    assert nb.cells[-1].outputs                                # the committed GPU results
