"""Tests for evaluate.py: the readers on synthetic and (when FAIRDIFF_DATA points at the data root)
real images, FID-C on real vs noise images, and the files evaluate_arms writes (the metric equations
themselves: test_metrics.py).

Synthetic MNIST: a tiny folder in torchvision's MNIST layout where "digit" k is a bar at a
k-dependent place, so a few training steps learn it and data.load works unchanged."""
import contextlib
import json
import math
import os
import sys
import threading
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the repo's flat modules (data.py, evaluate.py) without installing
import cli  # noqa: E402  (tests/cli.py)
import data  # noqa: E402
from data import DataConfig, load  # noqa: E402
from evaluate import Evaluator, evaluate_arm, evaluate_arms, format_table, get_evaluator  # noqa: E402
from metrics import frechet_distance  # noqa: E402
from idx import write_mnist  # noqa: E402  (tests/idx.py)

REAL_ROOT = os.environ.get("FAIRDIFF_DATA", "")
HAVE_MNIST = bool(REAL_ROOT) and (Path(REAL_ROOT) / "MNIST" / "raw" / "t10k-images-idx3-ubyte").exists()
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")  # torchvision.io
NO_MNIST = "real MNIST not found: set FAIRDIFF_DATA to the data root"
needs_mnist = pytest.mark.skipif(not HAVE_MNIST, reason=NO_MNIST)


# ------------------------------------------------------------------------------------ fixtures
@contextlib.contextmanager
def evaluation_threads():
    """torch on up to 4 threads inside, the caller's count after (the other modules' tiny models run on
    one). While the notebooks execute in the background (tests/test_notebooks.py, thread "notebooks"),
    their kernel computes on one core: more threads than free cores make OpenMP's waits spin against it
    (the evaluation CNN took four times as long to train that way)."""
    cores = os.cpu_count() or 1
    notebooks = any(t.name == "notebooks" and t.is_alive() for t in threading.enumerate())
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(4, cores - notebooks)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def threads():
    with evaluation_threads():
        yield


def synthetic_digits(n, seed):
    """uint8 [n, 28, 28] bars: digits 0-4 horizontal at row 3 + 5k, digits 5-9 vertical; labels [n]."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    images = torch.zeros(n, 28, 28, dtype=torch.uint8)
    for i, k in enumerate(labels.tolist()):
        at = 3 + 5 * (k % 5) + int(torch.randint(-1, 2, (1,), generator=gen))
        value = int(torch.randint(160, 256, (1,), generator=gen))
        if k < 5:
            images[i, at:at + 3, 4:24] = value
        else:
            images[i, 4:24, at:at + 3] = value
    return images, labels


@pytest.fixture(scope="session")
def fake_root(tmp_path_factory):
    return write_mnist(tmp_path_factory.mktemp("fake_data"), synthetic_digits, 3000, 600)


@pytest.fixture(scope="session")
def fake_evaluator(fake_root, tmp_path_factory):
    cfg = DataConfig(dataset="cmnist", data_root=str(fake_root))
    with evaluation_threads():              # session-scoped: set up before the autouse fixture
        return get_evaluator(cfg, tmp_path_factory.mktemp("runs"), "cpu", epochs=4)


@pytest.fixture(scope="session")
def real_evaluator(tmp_path_factory):
    """The digit CNN trained once per test run on real MNIST, in a temporary runs dir."""
    if not HAVE_MNIST:
        pytest.skip(NO_MNIST)
    runs = tmp_path_factory.mktemp("runs_real")
    with evaluation_threads():
        return get_evaluator(DataConfig(dataset="cmnist", data_root=REAL_ROOT), runs, "cpu"), runs


def test_fid_c_real_far_below_noise_synthetic(fake_evaluator, fake_root):
    cfg = DataConfig(dataset="cmnist", data_root=str(fake_root))
    train, test = load(cfg, "train").images, load(cfg, "test").images
    noise = torch.randint(0, 256, test.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    f_train, f_test = fake_evaluator.features(train), fake_evaluator.features(test)
    assert frechet_distance(f_train, f_test) * 10 < frechet_distance(fake_evaluator.features(noise), f_test)


def test_fid_c_real_far_below_noise_real(real_evaluator):
    evaluator, _ = real_evaluator
    cfg = DataConfig(dataset="cmnist", data_root=REAL_ROOT, bias=0.5)
    train, test = load(cfg, "train").images[:3000], load(cfg, "test").images[:3000]
    noise = torch.randint(0, 256, test.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    f_test = evaluator.features(test)
    real_vs_real = frechet_distance(evaluator.features(train), f_test)
    assert real_vs_real * 20 < frechet_distance(evaluator.features(noise), f_test)


# ---------------------------------------------------------------------------------------- readers
@pytest.mark.parametrize("colors", ["red,green", "blue,yellow,magenta,cyan", "white,red"])
def test_color_group_from_pixels_is_exact_on_synthetic_digits(colors, fake_root):
    cfg = DataConfig(dataset="cmnist", data_root=str(fake_root), colors=colors)
    test = load(cfg, "test")
    evaluator = Evaluator(cfg, {}, {})                      # the color reader needs no network
    assert torch.equal(evaluator.groups(test.images), test.group)
    blank = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    assert evaluator.groups(blank).tolist() == [-1, -1]


@needs_mnist
@pytest.mark.parametrize("colors", ["red,green", "blue,yellow,magenta"])
def test_color_group_from_pixels_is_exact_on_real_test_images(colors):
    cfg = DataConfig(dataset="cmnist", data_root=REAL_ROOT, colors=colors)
    test = load(cfg, "test")
    assert torch.equal(Evaluator(cfg, {}, {}).groups(test.images), test.group)


def test_digit_cnn_learns_synthetic_digits_and_reads_digit_pairs(fake_evaluator, fake_root):
    assert fake_evaluator.accuracies["digit"] >= 0.95
    assert fake_evaluator.accuracies["color (from pixels)"] == 1.0
    pair = DataConfig(dataset="mnist-pair", data_root=str(fake_root), digits="2,7")
    test = load(pair, "test")
    pair_evaluator = Evaluator(pair, fake_evaluator.nets, {})
    assert (pair_evaluator.groups(test.images) == test.group).double().mean() >= 0.95
    others = load(DataConfig(dataset="mnist-pair", data_root=str(fake_root), digits="0,1"), "test").images
    assert (pair_evaluator.groups(others) == -1).double().mean() >= 0.95   # neither a 2 nor a 7


@needs_mnist
def test_digit_cnn_reaches_99_percent_on_real_mnist(real_evaluator):
    evaluator, runs = real_evaluator
    assert evaluator.accuracies["digit"] >= 0.99
    assert evaluator.accuracies["color (from pixels)"] == 1.0
    # colored test digits in colors it never saw, through the public API
    cfg = DataConfig(dataset="cmnist", data_root=REAL_ROOT, colors="blue,yellow")
    test = load(cfg, "test")
    pred, confidence = Evaluator(cfg, evaluator.nets, {}).classes(test.images)
    assert (pred == test.label).double().mean() >= 0.99
    assert confidence.min() > 0 and confidence.max() <= 1
    # a second call loads the cached classifier instead of training again
    again = get_evaluator(DataConfig(dataset="cmnist", data_root=REAL_ROOT), runs, "cpu")
    assert again.accuracies == evaluator.accuracies


def test_celeba_readers_on_a_synthetic_folder(tmp_path, monkeypatch):
    """Write 90 tiny 'faces' (dark = male) with attribute and partition lists; train 1 epoch."""
    from torchvision.io import encode_jpeg
    monkeypatch.setattr(data, "CACHE_DIR", tmp_path / "cache")
    folder = tmp_path / "celeba" / "img_align_celeba"
    folder.mkdir(parents=True)
    names = [f"{i:06d}.jpg" for i in range(1, 91)]
    attributes = ["Male", "Smiling"]
    rows, parts = [], []
    for i, name in enumerate(names):
        male, smiling = i % 2 == 0, i % 4 < 2
        image = torch.full((3, 218, 178), 60 if male else 200, dtype=torch.uint8)
        (folder / name).write_bytes(encode_jpeg(image).numpy().tobytes())
        rows.append(f"{name} {1 if male else -1} {1 if smiling else -1}")
        parts.append(f"{name} {i // 30}")
    table = [str(len(names)), " ".join(attributes), *rows]
    (tmp_path / "celeba" / "list_attr_celeba.txt").write_text("\n".join(table))
    (tmp_path / "celeba" / "list_eval_partition.txt").write_text("\n".join(parts))
    cfg = DataConfig(dataset="celeba", data_root=str(tmp_path))
    evaluator = get_evaluator(cfg, tmp_path / "runs", "cpu", epochs=1)
    assert set(evaluator.accuracies) == {"gender", "Smiling"}
    assert (tmp_path / "runs" / "celeba" / "eval" / "gender_e1.pt").exists()
    test = load(cfg, "test")
    assert evaluator.groups(test.images).shape == (len(test),)
    assert set(evaluator.groups(test.images).tolist()) <= {0, 1}
    assert evaluator.features(test.images).shape == (len(test), 128)


# ------------------------------------------------------------------------------- evaluate_arms
def all_finite(value):
    if isinstance(value, dict):
        return all(all_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(all_finite(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


def test_evaluate_arms_writes_metrics_report_and_plots(fake_evaluator, fake_root, tmp_path):
    cfg = DataConfig(dataset="cmnist", data_root=str(fake_root))
    test = load(cfg, "test")
    red = test.images[test.group == 0][:200]
    by_group = {g: test.images[test.group == g][:100] for g in (0, 1)}
    by_class = {c: test.images[test.label == c][:20] for c in range(10)}
    arms = [{"name": "all red", "images": red, "alpha": 0.0},
            {"name": "balanced α=1", "images": test.images[:300], "cond_images": by_group,
             "class_images": by_class, "alpha": 1.0, "entropy_mean": 0.69}]
    metrics = evaluate_arms(arms, fake_evaluator, cfg, tmp_path, method="ddm", preset="tiny", device_name="cpu",
                            extra={"seed": 0})
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics)) and all_finite(saved)
    assert {"dataset", "device", "preset", "method", "classifiers", "reference", "arms", "seed"} == set(saved)
    assert saved["reference"]["train_FD_half_l1"] == pytest.approx(0.30)
    first, second = saved["arms"]
    assert first["p_hat"] == [1.0, 0.0] and first["FD_half_l1"] == 0.5
    assert first["FD_l2"] == pytest.approx(0.5 * math.sqrt(2)) and first["alpha"] == 0.0
    # real red digits: good quality against red test digits, far from the balanced test set
    assert first["FID_C"] * 5 < first["FID_C_vs_balanced"]
    assert {"SPD", "Bias_mean", "Bias_std", "cond_acc", "FID_C", "p_hat_ci", "FD_half_l1_ci"} <= set(second)
    assert second["entropy_mean"] == 0.69
    rates = second["success_rate"]                       # real images of the requested color
    assert set(rates) == {"0", "1"} and second["SPD"] == pytest.approx(abs(rates["0"] - rates["1"]))
    assert second["cond_acc"] >= 0.9                       # real images of the requested digit
    assert second["Bias_mean"] < 0.5                       # colors are independent of digits in real data
    for name in ("report.md", "tradeoff.png", "samples.png", "samples_all_red.png", "samples_balanced_alpha=1.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    report = (tmp_path / "report.md").read_text()
    assert format_table(metrics) in report and "SPD =" in report and "FID-C =" in report
    assert len(format_table(metrics).splitlines()) == 2 + len(arms)


def test_errors_name_the_bad_value(fake_evaluator, tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        fake_evaluator.groups(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="one D"):
        frechet_distance(torch.zeros(10, 3), torch.zeros(10, 4))
    with pytest.raises(ValueError, match="no arms"):
        evaluate_arms([], fake_evaluator, fake_evaluator.cfg, tmp_path, method="m", preset="tiny", device_name="cpu")
    with pytest.raises(ValueError, match="none of images"):
        evaluate_arms([{"name": "empty"}], fake_evaluator, fake_evaluator.cfg, tmp_path, method="m",
                      preset="tiny", device_name="cpu")
    run = cli.run(["evaluate.py", "--run", tmp_path / "missing"], cwd=REPO, env=os.environ, timeout=120)
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0 and "missing" in run.stderr


def test_spd_success_needs_a_confident_digit(fake_evaluator, fake_root):
    """Both conditions get the requested color, but only red samples are confidently a digit."""
    cfg = DataConfig(dataset="cmnist", data_root=str(fake_root))
    test = load(cfg, "test")
    evaluator = Evaluator(cfg, fake_evaluator.nets, {})
    evaluator.classes = lambda images: (torch.zeros(len(images), dtype=torch.long),
                                        torch.where(images[:, 0].flatten(1).amax(1) > 0, 1.0, 0.5))
    arm = {"name": "cond", "cond_images": {g: test.images[test.group == g][:50] for g in (0, 1)}}
    out = evaluate_arm(arm, evaluator, evaluator.real_moments(cfg, "test"))
    assert out["success_rate"] == {"0": 1.0, "1": 0.0} and out["SPD"] == 1.0


def test_cli_samples_a_run_and_writes_its_report(fake_root, tmp_path, monkeypatch, capsys):
    """The CLI against a stand-in for ddpm.load_pipeline that 'samples' real test images."""
    import types
    import evaluate
    cfg = DataConfig(dataset="cmnist", data_root=str(fake_root))
    test = load(cfg, "test")

    class Pipeline:
        data_cfg, preset = cfg, "tiny"

        def sample(self, n, cond=None, seed=0):
            return test.images[torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))[:n]]
    monkeypatch.setitem(sys.modules, "ddpm", types.SimpleNamespace(load_pipeline=lambda run_dir, device: Pipeline()))
    run = tmp_path / "runs" / "cmnist" / "base"
    run.mkdir(parents=True)
    evaluate.main(["--run", str(run), "--n", "200", "--runs-dir", str(tmp_path / "runs"), "--device", "cpu"])
    saved = json.loads((run / "eval" / "metrics.json").read_text())
    assert saved["preset"] == "tiny" and saved["n"] == 200 and saved["arms"][0]["n"] == 200
    assert (tmp_path / "runs" / "cmnist" / "eval" / "digit_e3.pt").exists()
    assert "| base |" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        evaluate.main(["--run", str(run), "--n", "1"])
    assert stop.value.code == 2 and "--n 1" in capsys.readouterr().err
