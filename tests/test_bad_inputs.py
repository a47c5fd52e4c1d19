"""Bad command-line values: each command line refuses them with one line (`error: ...`, exit 2) that
names the flag, before anything trains or is written, leaving the run and data folders byte-identical.

The cases complement test_core.py's BAD_INPUT table (bad files and folders, the first flags). Each runs
as `python SCRIPT ARGS` through tests/cli.py (a forked child of a process that imported torch once;
tests/test_cli.py checks that it prints what a new interpreter prints)."""
import hashlib
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the repo's flat modules without installing
import cli  # noqa: E402  (tests/cli.py)
import evaluate  # noqa: E402
from data import DataConfig  # noqa: E402
from idx import write_mnist  # noqa: E402  (tests/idx.py)
from test_core import synthetic_mnist  # noqa: E402

TRAINERS = ("ddpm.py", "vae.py", "ddm.py", "invdiff.py")


def vae_run(runs: Path) -> Path:
    run = runs / "cmnist" / "vae-0123abcd"
    run.mkdir(parents=True)
    (run / "ckpt.pt").write_bytes(b"an autoencoder")
    return run


def base_run(runs: Path) -> Path:
    run = runs / "cmnist" / "base-0123abcd"
    run.mkdir(parents=True)
    (run / "ckpt.pt").write_bytes(b"a base model")
    return run


def report_is_a_file(runs: Path) -> Path:
    run = base_run(runs)
    (run / "eval").write_text("not a folder")
    return run


def report_read_only(runs: Path) -> Path:
    run = base_run(runs)
    (run / "eval").mkdir()
    (run / "eval").chmod(0o500)
    return run


CUDA = "--device cuda: CUDA is not available; use --device cpu"
BAD_INPUT = [  # id, script, args (evaluate.py: setup of its --run folder first), what the line must contain
    ("ddpm-channels-not-a-number", "ddpm.py", ["--channels", "16,x"], ["--channels '16,x'", "positive integers"]),
    ("ddpm-channels-not-divisible", "ddpm.py", ["--channels", "12,32"], ["--channels 12,32", "--norm-groups 8"]),
    ("ddpm-sample-steps-0", "ddpm.py", ["--sample-steps", "0"], ["--sample-steps 0", "choose 1..1000"]),
    ("ddpm-p-uncond-above-1", "ddpm.py", ["--p-uncond", "2"], ["--p-uncond 2.0", "[0, 1]"]),
    ("ddpm-one-color", "ddpm.py", ["--colors", "red"], ["--colors 'red'", "two or more different colors"]),
    ("ddpm-same-color-twice", "ddpm.py", ["--colors", "red,red"], ["--colors 'red,red'", "two or more different"]),
    ("ddpm-digit-not-a-number", "ddpm.py", ["--dataset", "mnist-pair", "--digits", "7,x"],
     ["--digits '7,x'", "two different digits"]),
    ("ddpm-cuda-without-gpu", "ddpm.py", ["--device", "cuda"], [CUDA]),
    ("ddpm-unknown-device", "ddpm.py", ["--device", "tpu"], ["--device tpu", "choose cpu, cuda or cuda:N"]),
    ("vae-channels-not-a-number", "vae.py", ["--channels", "16,x"], ["--channels '16,x'", "positive integers"]),
    ("vae-channels-not-divisible", "vae.py", ["--channels", "12,32,32"], ["--channels 12,32,32", "divisible by 8"]),
    ("vae-latent-channels-0", "vae.py", ["--latent-channels", "0"], ["--latent-channels 0", ">= 1"]),
    ("vae-cuda-without-gpu", "vae.py", ["--device", "cuda"], [CUDA]),
    ("invdiff-negative-lam", "invdiff.py", ["--lam", "-1"], ["--lam -1.0 must be >= 0"]),
    ("invdiff-envs-0", "invdiff.py", ["--envs", "0"], ["--envs 0 must be >= 1"]),
    ("invdiff-module-width-2", "invdiff.py", ["--module-width", "2"], ["--module-width 2.0", "(0, 1]"]),
    ("invdiff-sample-steps-0", "invdiff.py", ["--sample-steps", "0"], ["--sample-steps 0 must be >= 1"]),
    ("invdiff-one-color", "invdiff.py", ["--colors", "red"], ["--colors 'red'"]),
    ("ddm-seeds-not-numbers", "ddm.py", ["--seeds", "x"], ["--seeds"]),
    ("ddm-alpha-above-1", "ddm.py", ["--alphas", "0,2"], ["--alphas 0,2", "[0, 1]"]),
    ("ddm-alphas-without-0", "ddm.py", ["--alphas", "0.1"], ["--alphas 0.1", "include 0"]),
    ("ddm-unknown-protocol", "ddm.py", ["--protocol", "foo"], ["--protocol 'foo'"]),
    ("ddm-train-ratio-not-a-ratio", "ddm.py", ["--train-ratios", "1-4"], ["--train-ratios", "'1-4'"]),
    ("ddm-guidance-scale-0", "ddm.py", ["--guidance-scales", "0"], ["--guidance-scales '0'", "positive"]),
    ("ddm-unknown-finetune", "ddm.py", ["--finetune", "bad"], ["--finetune 'bad'", "full or lora"]),
    ("evaluate-autoencoder-run", "evaluate.py", [vae_run], ["is an autoencoder run", "runs/cmnist/base-<hash>"]),
    ("evaluate-report-folder-is-a-file", "evaluate.py", [report_is_a_file], ["report folder", "not writable"]),
    ("evaluate-report-folder-read-only", "evaluate.py", [report_read_only], ["report folder", "not writable"]),
    ("evaluate-n-not-a-number", "evaluate.py", [base_run, "--n", "x"], ["--n: invalid int value: 'x'"]),
    ("evaluate-bad-download", "evaluate.py", [base_run, "--download", "maybe"], ["--download", "'maybe'"]),
    ("evaluate-cuda-without-gpu", "evaluate.py", [base_run, "--device", "cuda"], [CUDA]),
]


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory):
    return write_mnist(tmp_path_factory.mktemp("mnist"), synthetic_mnist, 2400, 400)


def tree(folder: Path) -> dict:
    """Every file and folder under folder: a file by the SHA-256 of its bytes, a folder by None."""
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("case", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_value_is_one_line_naming_the_flag_and_changes_nothing(case, mnist_root, tmp_path):
    name, script, args, expected = case
    if CUDA in expected and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    if name.endswith("read-only") and os.geteuid() == 0:
        pytest.skip("running as root: chmod does not stop writes (report-folder-is-a-file covers this)")
    runs = tmp_path / "runs"
    runs.mkdir()
    if script == "evaluate.py":
        run, *rest = args
        argv = ["--run", str(run(runs)), *rest, "--runs-dir", str(runs)]
    else:
        argv = ["--preset", "tiny", "--device", "cpu", "--runs", str(runs), *args]     # a later --device wins
    env = {**os.environ, "FAIRDIFF_DATA": str(mnist_root), "FAIRDIFF_CACHE": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1"}
    before_runs, before_data = tree(runs), tree(mnist_root)
    try:
        r = cli.run([script, *argv], cwd=REPO, env=env, timeout=60)
    finally:
        if name.endswith("read-only"):
            (runs / "cmnist" / "base-0123abcd" / "eval").chmod(0o700)
    lines = r.stderr.splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    assert all(text in lines[0] for text in expected), lines[0]
    assert tree(runs) == before_runs and tree(mnist_root) == before_data
    assert not (tmp_path / "cache").exists()


def test_evaluate_reads_data_root_and_download_from_its_flags(tmp_path, monkeypatch, capsys):
    """--data-root replaces the run's data root: an empty one stops before sampling, naming MNIST."""
    import types

    class Pipeline:
        data_cfg, preset = DataConfig(dataset="cmnist"), "tiny"

        def sample(self, n, cond=None, seed=0):
            raise AssertionError("sampled before the data root was checked")
    monkeypatch.setitem(sys.modules, "ddpm", types.SimpleNamespace(load_pipeline=lambda run_dir, device: Pipeline()))
    run = base_run(tmp_path / "runs")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as stop:
        evaluate.main(["--run", str(run), "--data-root", str(tmp_path / "empty"), "--download", "false",
                       "--runs-dir", str(tmp_path / "runs"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "MNIST not found" in err and str(tmp_path / "empty") in err, err
