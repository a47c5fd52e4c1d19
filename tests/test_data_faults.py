"""Faulty data files stop a run with one line that names the file, and leave the data root as it was.

Every data root here is a tiny synthetic one in tmp_path (MNIST: 12 + 6 images in IDX files, gzip'd
or not; CelebA: 6 small JPEGs with their two lists), so no test needs the real data or a network:
torchvision's download function is replaced by a fake that either serves the synthetic archives or
fails as it would offline, under each value of --download (auto, true, false). Each fault is checked
for its message (one line, naming the file and the fix) and for the data root being byte-identical
before and after. The last tests run the CLI and the rules of tests/conftest.py in subprocesses.
"""
import gzip
import hashlib
import http.client
import os
import shutil
import subprocess
import sys
import textwrap
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.io import encode_jpeg

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))                          # the repo's flat modules without installing
sys.path.insert(0, str(Path(__file__).parent))
import cli  # noqa: E402  (tests/cli.py)
import data  # noqa: E402
import datafiles  # noqa: E402
from data import DataConfig  # noqa: E402
from idx import write_idx_split  # noqa: E402  (tests/idx.py)

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")  # torchvision.io
N = {"train": 12, "t10k": 6}                           # images per split of the synthetic MNIST


# ---------------------------------------------------------------------------------------- helpers
def tree(root: Path) -> dict:
    """{relative path: sha256 of the bytes, or 'dir'} of everything under root."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def raises_one_line(kind, fn, *names) -> str:
    """fn() raises `kind` with a one-line message that contains every string in names."""
    with pytest.raises(kind) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message, message
    for name in names:
        assert name in message, message
    return message


def mnist_split(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8), torch.randint(0, 10, (n,), generator=g)


def mnist_root(root: Path, packed: bool) -> Path:
    """root/MNIST/raw with the four synthetic files, unpacked or only as .gz archives."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for seed, split in enumerate(N):
        write_idx_split(raw, split, *mnist_split(N[split], seed))
    if packed:
        for f in datafiles.MNIST_FILES:
            (raw / f"{f}.gz").write_bytes(gzip.compress((raw / f).read_bytes(), mtime=0))
            (raw / f).unlink()
    return root


def load_mnist(root: Path, download="auto"):
    return data.load(DataConfig(data_root=str(root), download=download), "train")


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No test reaches the network: a download fails the test unless a test installs its own fake."""
    def no_network(*args, **kwargs):
        raise AssertionError("tried to reach the network")
    monkeypatch.setattr(torchvision.datasets.utils, "download_url", no_network)
    monkeypatch.setattr(torchvision.datasets.MNIST, "download", no_network)
    monkeypatch.setattr(torchvision.datasets.CelebA, "download", no_network)
    monkeypatch.setattr(data, "CACHE_DIR", tmp_path / "cache")        # never ./runs/cache


# ------------------------------------------------------------------------------------------ MNIST
def test_a_truncated_last_archive_is_named_before_anything_is_unpacked(tmp_path):
    """The fourth .gz cut short: one line naming it, the first three not unpacked, no download."""
    root = mnist_root(tmp_path / "data", packed=True)
    last = root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    last.write_bytes(last.read_bytes()[:-10])
    before = tree(root)
    for download in datafiles.DOWNLOAD:                # a corrupt file is never fetched again behind one's back
        raises_one_line(ValueError, lambda: load_mnist(root, download), str(last), "not a complete gzip archive",
                        "delete it")
        assert tree(root) == before


def header_field(path: Path, k: int, value: int, cut=0):
    """Set the k-th 32-bit header field (0 = magic) and drop `cut` bytes from the end."""
    b = path.read_bytes()
    path.write_bytes(b[:4 * k] + value.to_bytes(4, "big") + b[4 * k + 4:len(b) - cut])


def gzip_in_place(path: Path, cut=0, bad_crc=False):
    """Replace path by path.gz holding its bytes less the last `cut`; bad_crc zeroes the gzip trailer."""
    b = path.read_bytes()
    blob = gzip.compress(b[:len(b) - cut], mtime=0)
    path.with_name(path.name + ".gz").write_bytes(blob[:-8] + bytes(8) if bad_crc else blob)
    path.unlink()


FAULTS = {  # name: (file, damage(path), what the message must say)
    "truncated-images": ("train-images-idx3-ubyte", lambda p: p.write_bytes(p.read_bytes()[:-100]), "truncated"),
    "empty-labels": ("train-labels-idx1-ubyte", lambda p: p.write_bytes(b""), "shorter than an IDX header"),
    "labels-magic-on-images": ("t10k-images-idx3-ubyte", lambda p: header_field(p, 0, 2049), "magic 2049, not 2051"),
    "27x28-images": ("t10k-images-idx3-ubyte", lambda p: header_field(p, 2, 27), "27x28 images, not MNIST's 28x28"),
    "one-label-short": ("t10k-labels-idx1-ubyte", lambda p: header_field(p, 1, 5, cut=1),
                        "t10k-images-idx3-ubyte holds 6 images but t10k-labels-idx1-ubyte 5 labels"),
    "gz-not-gzip": ("train-images-idx3-ubyte", lambda p: p.rename(p.with_name(p.name + ".gz")),
                    "not a complete gzip archive"),
    "gz-bad-crc": ("t10k-images-idx3-ubyte", lambda p: gzip_in_place(p, bad_crc=True), "not a complete gzip archive"),
    "gz-of-a-truncated-file": ("train-images-idx3-ubyte", lambda p: gzip_in_place(p, cut=784), "truncated"),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_each_bad_mnist_file_gives_one_line_naming_it_and_changes_nothing(fault, tmp_path):
    root = mnist_root(tmp_path / "data", packed=False)
    name, damage, says = FAULTS[fault]
    path = root / "MNIST" / "raw" / name
    damage(path)
    before = tree(root)
    named = path if path.exists() else path.with_name(name + ".gz")
    raises_one_line(ValueError, lambda: load_mnist(root), str(named.name), says)
    assert tree(root) == before


def test_a_truncated_unpacked_file_next_to_its_archive_says_it_is_unpacked_again(tmp_path):
    root = mnist_root(tmp_path / "data", packed=False)
    path = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    (path.with_name(path.name + ".gz")).write_bytes(gzip.compress(path.read_bytes()))
    path.write_bytes(path.read_bytes()[:5000])
    raises_one_line(ValueError, lambda: load_mnist(root), str(path), "truncated", "the .gz next to it is unpacked again")
    path.unlink()                                                      # the fix the message names
    assert len(load_mnist(root)) == N["train"]


def test_archives_alone_are_unpacked_in_place_offline(tmp_path):
    """Only the four .gz: each is checked, unpacked through a temp name; no download, no temp left."""
    root = mnist_root(tmp_path / "data", packed=True)
    raw = root / "MNIST" / "raw"
    test = data.load(DataConfig(data_root=str(root)), "test")           # cmnist's test split
    images, labels = mnist_split(N["t10k"], 1)
    assert len(test) == N["t10k"] and sorted(test.label.tolist()) == sorted(labels.tolist())
    assert sorted(p.name for p in raw.iterdir()) == sorted(datafiles.MNIST_FILES + [f + ".gz" for f in datafiles.MNIST_FILES])
    for f in datafiles.MNIST_FILES:
        assert (raw / f).read_bytes() == gzip.decompress((raw / f"{f}.gz").read_bytes())
    gray, digits = datafiles.load_mnist(raw, train=False, download="false")   # [6, 28, 28], [6]
    assert torch.equal(gray, images) and torch.equal(digits, labels)


def test_absent_mnist_under_download_false_says_where_to_put_which_files(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    raw = (root / "MNIST" / "raw").resolve()
    files = [f + ".gz" for f in datafiles.MNIST_FILES]
    raises_one_line(FileNotFoundError, lambda: load_mnist(root, "false"), "MNIST not found",
                    "--download false uses no network", f"{raw}/", "--download true", *files)
    assert tree(root) == {}


def no_route():
    return urllib.error.URLError("[Errno -3] Temporary failure in name resolution")    # what urlopen raises offline


def fake_download(served, urls, error=no_route):
    """torchvision's download_url, serving the synthetic archives in `served` (name -> bytes) and
    raising error() for any other."""
    def download_url(url, root, filename=None, md5=None):
        urls.append(url)
        name = url.rsplit("/", 1)[1]
        if name not in served:
            raise error()
        Path(root, name).write_bytes(served[name])
    return download_url


def served_archives(tmp_path) -> dict:
    raw = mnist_root(tmp_path / "source", packed=True) / "MNIST" / "raw"
    return {p.name: p.read_bytes() for p in raw.iterdir()}


@pytest.mark.parametrize("download", ["auto", "true"])
def test_absent_mnist_is_fetched_and_the_folder_is_said(download, tmp_path, monkeypatch, capsys):
    """auto (the default) and true fetch MNIST that is not there at all, and print where it goes."""
    served, urls = served_archives(tmp_path), []
    monkeypatch.setattr(torchvision.datasets.utils, "download_url", fake_download(served, urls))
    root = tmp_path / "data"
    assert len(load_mnist(root, download)) == N["train"]
    raw = root / "MNIST" / "raw"
    said = [line for line in capsys.readouterr().out.splitlines() if "MNIST" in line]
    assert len(said) == 1 and f"into {raw.resolve()}/" in said[0], said
    assert [u.rsplit("/", 1)[1] for u in urls] == [f + ".gz" for f in datafiles.MNIST_FILES]
    assert all(u.startswith(torchvision.datasets.mnist.MNIST.mirrors[0]) for u in urls)
    assert {f"{f}.gz": (raw / f"{f}.gz").read_bytes() for f in datafiles.MNIST_FILES} == served
    assert sorted(p.name for p in raw.iterdir()) == sorted(datafiles.MNIST_FILES + list(served))  # no temp left
    urls.clear()
    load_mnist(root, download)                         # everything there: no network
    assert urls == []


OFFLINE = {  # name: (--download, what the fake raises, what the message must say)
    "auto-no-network": ("auto", no_route, "Temporary failure"),
    "true-no-network": ("true", no_route, "Temporary failure"),
    "auto-timeout": ("auto", lambda: TimeoutError("timed out"), "timed out"),
    "auto-connection-cut": ("auto", lambda: http.client.IncompleteRead(b"x" * 5, 10), "IncompleteRead"),
}


@pytest.mark.parametrize("case", OFFLINE)
def test_a_failed_fetch_names_the_folder_and_files_and_writes_nothing(case, tmp_path, monkeypatch):
    """One archive arrived, then the network failed: one line naming the folder and the four files,
    and nothing kept in the data root."""
    download, error, says = OFFLINE[case]
    served = {k: v for k, v in served_archives(tmp_path).items() if k.startswith("train-images")}
    monkeypatch.setattr(torchvision.datasets.utils, "download_url", fake_download(served, [], error))
    root = tmp_path / "data"
    root.mkdir()
    raw = (root / "MNIST" / "raw").resolve()
    raises_one_line(FileNotFoundError, lambda: load_mnist(root, download), "could not download MNIST",
                    "train-labels-idx1-ubyte.gz", says, f"{raw}/", *(f + ".gz" for f in datafiles.MNIST_FILES))
    assert tree(root) == {}


def test_a_partial_copy_is_completed_only_under_download_true(tmp_path, monkeypatch):
    """One archive absent, the others fine: auto and false name it and stay offline; true fetches it alone."""
    root = mnist_root(tmp_path / "data", packed=True)
    gone = root / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz"
    served = {gone.name: gone.read_bytes()}
    gone.unlink()
    before = tree(root)
    for download in ("auto", "false"):
        raises_one_line(FileNotFoundError, lambda: load_mnist(root, download), "MNIST incomplete",
                        gone.name, f"{gone.parent.resolve()}/", "--download true")
        assert tree(root) == before
    urls = []
    monkeypatch.setattr(torchvision.datasets.utils, "download_url", fake_download(served, urls))
    assert len(load_mnist(root, "true")) == N["train"]
    assert [u.rsplit("/", 1)[1] for u in urls] == [gone.name] and gone.read_bytes() == served[gone.name]


@pytest.mark.parametrize("download", datafiles.DOWNLOAD)
def test_a_faulty_file_beside_an_absent_one_stops_before_any_fetch(download, tmp_path, monkeypatch):
    """An absent archive and a cut-off one: whatever --download says, the cut-off one is named
    and the fetch is never called."""
    root = mnist_root(tmp_path / "data", packed=True)
    raw = root / "MNIST" / "raw"
    (raw / "t10k-images-idx3-ubyte.gz").unlink()
    bad = raw / "train-labels-idx1-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:-10])
    before = tree(root)
    fetched = []
    monkeypatch.setattr(datafiles, "fetch", lambda raw, names: fetched.append(names))
    raises_one_line(ValueError, lambda: load_mnist(root, download), str(bad), "not a complete gzip archive")
    assert fetched == [] and tree(root) == before


def test_a_bad_download_value_is_one_line_naming_the_flag_and_the_choices():
    assert DataConfig().download == "auto"
    raises_one_line(ValueError, lambda: data.check_config(DataConfig(download="yes")), "--download 'yes'",
                    "auto", "true", "false")


# ----------------------------------------------------------------------------------------- CelebA
def celeba_root(root: Path) -> Path:
    """6 faces (64x64 JPEGs, the compact copy's size), 2 attributes, 4 train / 1 val / 1 test."""
    base = root / "celeba"
    (base / "img_align_celeba").mkdir(parents=True)
    rows, parts = [], []
    for i in range(6):
        name = f"{i + 1:06d}.jpg"
        img = torch.full((3, 64, 64), 40 * i, dtype=torch.uint8)
        (base / "img_align_celeba" / name).write_bytes(encode_jpeg(img).numpy().tobytes())
        rows.append(f"{name} {1 if i % 2 else -1} {1 if i < 3 else -1}")
        parts.append(f"{name} {0 if i < 4 else i - 3}")
    (base / "list_attr_celeba.txt").write_text("\r\n".join(["6", "Male Smiling", *rows, ""]))
    (base / "list_eval_partition.txt").write_text("\r\n".join([*parts, ""]))
    return root


def celeba(root: Path, **kw):
    """The train split of celeba_root: its 4 train images, 2 men and 2 women."""
    return data.load(DataConfig(dataset="celeba", data_root=str(root), bias=0.5, n_train=4, **kw), "train")


def edit_lines(path: Path, change):
    path.write_text("\r\n".join(change(path.read_text().splitlines())))


CELEBA_FAULTS = {  # name: (file, damage(path), what the message must say)
    "empty-attributes": ("list_attr_celeba.txt", lambda p: p.write_text(""), "is empty or malformed"),
    "binary-attributes": ("list_attr_celeba.txt", lambda p: p.write_bytes(bytes(range(256))), "is empty or malformed"),
    "short-row": ("list_attr_celeba.txt", lambda p: edit_lines(p, lambda ls: ls[:4] + [ls[4].rsplit(" ", 1)[0]] + ls[5:]),
                  "line 5 is malformed"),
    "cut-off-attributes": ("list_attr_celeba.txt", lambda p: edit_lines(p, lambda ls: ls[:5]),
                           "says 6 images on line 1 but lists 3"),
    "no-male-column": ("list_attr_celeba.txt", lambda p: edit_lines(p, lambda ls: [ls[0], "Female Smiling", *ls[2:]]),
                       "has no Male column"),
    "empty-partition": ("list_eval_partition.txt", lambda p: p.write_text(""), "is empty"),
    "bad-partition": ("list_eval_partition.txt", lambda p: edit_lines(p, lambda ls: [ls[0], "000002.jpg 7", *ls[2:]]),
                      "line 2 is malformed"),
    "partition-row-missing": ("list_eval_partition.txt", lambda p: edit_lines(p, lambda ls: ls[:-1]),
                              "has no row for 000006.jpg"),
    "truncated-jpeg": ("img_align_celeba/000003.jpg", lambda p: p.write_bytes(p.read_bytes()[:200]),
                       "is not a readable image"),
    "empty-jpeg": ("img_align_celeba/000005.jpg", lambda p: p.write_bytes(b""), "is not a readable image"),
}


@pytest.mark.parametrize("fault", CELEBA_FAULTS)
def test_each_bad_celeba_file_gives_one_line_naming_it_and_changes_nothing(fault, tmp_path):
    root = celeba_root(tmp_path / "data")
    name, damage, says = CELEBA_FAULTS[fault]
    damage(root / "celeba" / name)
    before = tree(root)
    raises_one_line(ValueError, lambda: celeba(root), str(root / "celeba" / name), says)
    assert tree(root) == before


def test_celeba_download_without_gdown_says_to_place_it_by_hand(tmp_path, monkeypatch):
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gdown" else find_spec(name, *a))
    root = tmp_path / "data"
    root.mkdir()
    raises_one_line(FileNotFoundError, lambda: celeba(root, download="true"), "cannot fetch CelebA", "gdown",
                    f"{(root / 'celeba').resolve()}/ by hand", *data.CELEBA_FILES)
    assert tree(root) == {}


def test_absent_celeba_is_not_fetched_under_download_auto(tmp_path):
    """CelebA comes from Google Drive only with --download true: auto (the default) names what to place where."""
    root = tmp_path / "data"
    root.mkdir()
    raises_one_line(FileNotFoundError, lambda: celeba(root), "CelebA not found", str(root.resolve()),
                    "--download true", *data.CELEBA_FILES)
    assert tree(root) == {}


# ----------------------------------------------------------------------------------------- caches
def test_a_truncated_decode_cache_is_rebuilt_and_stale_temp_files_go(tmp_path, capsys):
    root = celeba_root(tmp_path / "data")
    first = celeba(root).images
    (cache,) = data.CACHE_DIR.glob("celeba_*.pt")
    cache.write_bytes(cache.read_bytes()[:1000])
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = cache.with_name(f"{cache.name}.{int(ended.stdout)}.tmp")      # its writer no longer runs
    live = cache.with_name(f"{cache.name}.{os.getppid()}.tmp")             # its writer still runs
    stale.write_bytes(b"half")
    live.write_bytes(b"being written")
    assert torch.equal(celeba(root).images, first)
    assert f"cache {cache} is unreadable" in capsys.readouterr().err
    assert not stale.exists() and live.exists()
    assert torch.load(cache, weights_only=True).shape == (6, 3, 64, 64)   # rewritten whole


def test_a_truncated_latent_cache_is_rebuilt(tmp_path, capsys):
    import vae
    root = mnist_root(tmp_path / "data", packed=False)
    cfg = DataConfig(data_root=str(root))
    torch.manual_seed(0)
    model = vae.Autoencoder((8, 8), latent_channels=2).eval()
    (tmp_path / "vae").mkdir()
    first = vae.encode_dataset(model, tmp_path / "vae", cfg, "cpu")
    (cache,) = (tmp_path / "vae").glob("latents-*.pt")
    cache.write_bytes(cache.read_bytes()[:500])
    again = vae.encode_dataset(model, tmp_path / "vae", cfg, "cpu")
    assert "is unreadable" in capsys.readouterr().err
    assert torch.equal(again["group"], first["group"]) and again["z0"].shape == first["z0"].shape
    assert [p.name for p in (tmp_path / "vae").iterdir()] == [cache.name]  # no temp file left


# ------------------------------------------------------------------------------ CLI and conftest
def cli_error(root: Path, tmp_path: Path, *flags) -> str:
    """vae.py on data root `root` with flags: it must exit 2 with one line on stderr, returned."""
    env = {**os.environ, "FAIRDIFF_DATA": str(root), "FAIRDIFF_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    r = cli.run(["vae.py", "--dataset", "cmnist", "--preset", "tiny", "--device", "cpu",     # tests/cli.py: as
                 "--runs", str(tmp_path / "runs"), *flags], cwd=REPO, env=env, timeout=120)   # `python vae.py ...`
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def test_the_cli_prints_the_fault_as_one_line_and_exits_2(tmp_path):
    """Under the default --download auto, in a process whose network is not faked."""
    root = mnist_root(tmp_path / "data", packed=True)
    last = root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    last.write_bytes(last.read_bytes()[:-10])
    before = tree(root)
    assert str(last) in cli_error(root, tmp_path)
    assert tree(root) == before


def test_the_cli_refuses_a_bad_download_value_in_one_line(tmp_path):
    root = mnist_root(tmp_path / "data", packed=True)
    before = tree(root)
    line = cli_error(root, tmp_path, "--download", "maybe")
    assert all(s in line for s in ("--download 'maybe'", "auto", "true", "false")), line
    assert tree(root) == before


def run_pytest_with_conftest(folder: Path, **env):
    """pytest on a copy of tests/conftest.py with three small tests (one reads FAIRDIFF_DATA, one skips
    for want of it) and two notebook tests (one skips)."""
    folder.mkdir()
    shutil.copy(REPO / "tests" / "conftest.py", folder / "conftest.py")
    (folder / "test_reads.py").write_text(textwrap.dedent("""
        import os, pytest
        def test_reads_the_data():
            open(os.path.join(os.environ["FAIRDIFF_DATA"], "x.txt")).read()
        def test_needs_nothing():
            pass
        @pytest.mark.skipif(True, reason="real MNIST not found: set FAIRDIFF_DATA to the data root")
        def test_skips_without_the_data():
            pass
    """))
    (folder / "test_notebooks.py").write_text("import pytest\ndef test_a():\n    pass\n"
                                                "def test_b():\n    pytest.skip('no kernel')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "FAIRDIFF_DATA")} | env
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(folder)],
                       cwd=folder, env=env, capture_output=True, text=True, timeout=60)
    return r.returncode, r.stdout + r.stderr


def test_conftest_stops_ci_without_the_data_and_counts_real_data_tests(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "x.txt").write_text("x")
    for missing in ({}, {"FAIRDIFF_DATA": str(root / "x.txt")}):           # unset, or a file
        rc, out = run_pytest_with_conftest(tmp_path / f"ci{len(missing)}", CI="true", **missing)
        assert rc == pytest.ExitCode.USAGE_ERROR and "CI=true but FAIRDIFF_DATA" in out and "passed" not in out, out
    rc, out = run_pytest_with_conftest(tmp_path / "local", FAIRDIFF_DATA=str(root))
    assert rc == 0, out
    assert (f"real data (FAIRDIFF_DATA={root}): 1 tests read it, 1 skipped for want of it; "
            "notebook tests: 1 ran, 1 skipped") in out
    rc, out = run_pytest_with_conftest(tmp_path / "ci", FAIRDIFF_DATA=str(root), CI="true")
    assert rc == pytest.ExitCode.TESTS_FAILED and "CI=true: failing the run, 1 real-data tests skipped" in out, out


def test_the_decode_cache_follows_the_run_root(tmp_path, monkeypatch):
    """Without CACHE_DIR or $FAIRDIFF_CACHE, CelebA's decoded images go under --runs, not ./runs."""
    import config
    monkeypatch.setattr(data, "CACHE_DIR", None)
    monkeypatch.delenv("FAIRDIFF_CACHE", raising=False)
    monkeypatch.setenv("FAIRDIFF_RUNS", "runs")
    config.parse_config(DataConfig, {}, ["--runs", str(tmp_path / "elsewhere"), "--device", "cpu"])
    assert data.cache_dir() == tmp_path / "elsewhere" / "cache"
    celeba(celeba_root(tmp_path / "data"))
    assert list((tmp_path / "elsewhere" / "cache").glob("celeba_*.pt"))


def test_a_truncated_classifier_cache_is_retrained(tmp_path, capsys):
    """An evaluation classifier whose cache was cut off is trained again, not a traceback."""
    import classifiers
    images, targets = torch.randint(0, 256, (64, 1, 32, 32), dtype=torch.uint8), torch.arange(64) % 10
    path = tmp_path / "digit.pt"
    kw = dict(epochs=1, device="cpu")
    _, first = classifiers.cached_classifier(path, 1, 10, lambda: (images, targets), (images, targets), **kw)
    path.write_bytes(path.read_bytes()[:100])
    _, again = classifiers.cached_classifier(path, 1, 10, lambda: (images, targets), (images, targets), **kw)
    assert again == first and "unreadable" in capsys.readouterr().err
    assert classifiers.cached_classifier(path, 1, 10, None, None, **kw)[1] == first      # read back, not retrained
