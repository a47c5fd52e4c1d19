"""bench.py on CPU with --quick: the JSON it writes, the FLOP bookkeeping behind MFU, the device
peak table, and (when diffusers is installed) that the matched UNet2DModel is our UNet's twin."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the repo's flat modules without installing
from bench import peak_bf16  # noqa: E402

TIMED = ("train_img_per_s", "train_ms_per_step", "train_loss", "train_gflop_per_img",
         "forward_gflop_per_img", "decode_gflop_per_img")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "cpu.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")   # a tiny model on a shared CPU: threads only contend
    run = subprocess.run([sys.executable, str(REPO / "bench.py"), "--quick", "--device", "cpu",
                          "--compare", "diffusers", "--out", str(out)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(out.read_text()), run.stdout


def test_quick_bench_writes_finite_figures(quick):
    report, stdout = quick
    assert report["device"] == "cpu" and report["torch"] and report["options"]["quick"]
    assert report["peak_bf16_dense_flops"] is None            # unknown device -> no MFU
    assert set(report["configs"]) == {"cmnist", "celeba"}
    assert report["configs"]["cmnist"]["config"]["latent"] == [4, 8, 8]
    assert report["configs"]["celeba"]["config"]["latent"] == [4, 16, 16]
    for dataset, entry in report["configs"].items():
        r = entry["fairdiff"]
        assert isinstance(r["params"], int) and r["params"] > 0
        for key in TIMED:
            assert math.isfinite(r[key]) and r[key] > 0, (dataset, key, r[key])
        assert r["train_mfu"] is None and r["train_peak_mem_gib"] is None   # CPU: no peak, no CUDA memory
        for sampler, steps in (("sample_ddim", 4), ("sample_ddpm", 8)):
            s = r[sampler]
            assert s["steps"] == steps and s["images"] == 8
            assert math.isfinite(s["img_per_s"]) and s["img_per_s"] > 0
            assert s["img_per_s"] == pytest.approx(s["images"] / s["seconds"])
            # sampling FLOPs = steps UNet forwards + one VAE decode
            assert s["gflop_per_img"] == pytest.approx(steps * r["forward_gflop_per_img"] + r["decode_gflop_per_img"])
        # backward ≈ 2 forwards (less the input gradient of the first conv)
        assert 2.5 < r["train_gflop_per_img"] / r["forward_gflop_per_img"] < 3.05
    assert "cmnist" in stdout and "train img/s" in stdout        # the table


def test_flops_grow_with_the_latent(quick):
    """Same tiny UNet widths on 16×16 instead of 8×8 latents: 4× the conv FLOPs (attention more)."""
    report, _ = quick
    ratio = (report["configs"]["celeba"]["fairdiff"]["forward_gflop_per_img"]
             / report["configs"]["cmnist"]["fairdiff"]["forward_gflop_per_img"])
    assert 3.9 < ratio < 5


def test_diffusers_comparison_or_clear_skip(quick):
    report, stdout = quick
    if report["diffusers"] is None:
        assert "diffusers is not installed: skipping" in stdout
        assert all("diffusers" not in entry for entry in report["configs"].values())
        return
    for entry in report["configs"].values():
        ours, theirs = entry["fairdiff"], entry["diffusers"]
        assert theirs["params"] == ours["params"]            # the matched config is the same network
        assert theirs["forward_gflop_per_img"] == pytest.approx(ours["forward_gflop_per_img"], rel=0.01)
        assert math.isfinite(theirs["train_img_per_s"]) and theirs["train_img_per_s"] > 0


def test_device_peaks():
    assert peak_bf16("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16("NVIDIA H200") == 989e12
    assert peak_bf16("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16("NVIDIA GeForce RTX 4090") is None


def test_stacked_sampling_bench_times_both_precisions_from_the_same_noise():
    """bench_sweep --sampling, tiny on CPU: both precisions timed, and the bfloat16 copy's latents near
    the float32 ones without equalling them (it did run in bfloat16, on the same noise)."""
    import bench_sweep
    entry = bench_sweep.sampling_rates("cmnist", 3, 3, 7.5, "cpu", preset="tiny", latents_per_arm=4)
    for name in ("float32", "bfloat16"):
        assert entry[name]["latents_per_s"] == pytest.approx(3 * 4 / entry[name]["seconds"])
    assert 0 < entry["bfloat16_deviation"] < 0.1
