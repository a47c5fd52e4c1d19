"""InvDiff's stacked guidance modules train like lone ones: train_arms computes the frozen ε_θ once per
seed and hands it to every arm of that seed, so an arm's weights must not depend on which other arms
(of its own seed or another) were stacked beside it."""
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ddpm  # noqa: E402
import invdiff  # noqa: E402
from data import DataConfig  # noqa: E402
from environments import project_rows  # noqa: E402
from unet import UNet  # noqa: E402


def test_stacked_arms_sharing_the_base_prediction_train_like_lone_arms(tmp_path):
    """Three arms, two of them at seed 0 (so they share ε_θ), one at seed 1: each ends where it ends
    trained alone. If the per-seed ε_θ went to the wrong arm, the seed-1 arm would differ.

    Compared in float64, as tests/test_stack.py does: a stack of three arms and a stack of one (and the
    base on S·B latents against B) run kernels that sum in other orders, and AdamW's step
    lr·m̂/(√v̂ + 1e-8) turns a gradient's rounding error Δg into an update error of up to lr·Δg/1e-8
    where a gradient is near zero, which in float32 (Δg ~ 1e-9) can reach the learning rate itself.
    With float64's Δg ~ 1e-16 it stays below 4 steps · 1e-3 · 1e-16 / 1e-8 = 4e-11, inside 1e-9
    (observed: ~3e-17)."""
    torch.manual_seed(0)
    base = UNet(4, (16, 32), 1, 10, 8)
    torch.nn.init.normal_(base.out[-1].weight, std=0.1)            # a base whose prediction is not zero
    base = base.double()
    pipe = SimpleNamespace(unet=base, cfg=ddpm.base_config(DataConfig(), "tiny"), device="cpu")
    g = torch.Generator().manual_seed(2)
    z0, label = torch.randn(64, 4, 8, 8, generator=g).double(), torch.randint(0, 10, (64,), generator=g)
    W = project_rows(torch.rand(64, 2, generator=g)).double()
    erm = torch.nn.functional.pad(torch.ones(64, 1, dtype=torch.float64), (0, 1))
    arms = [invdiff.Arm("inferred", 1.0, 0), invdiff.Arm("erm", 0.0, 0), invdiff.Arm("inferred", 10.0, 1)]
    envs = [W, erm, W]
    cfg = invdiff.InvDiffConfig(**{**invdiff.PRESETS["tiny"], "steps": 4, "ckpt_every": 4})

    stacked = invdiff.train_arms(pipe, cfg, arms, envs, z0, label, tmp_path / "stacked").stacked
    for a, (arm, W_a) in enumerate(zip(arms, envs)):
        alone = invdiff.train_arms(pipe, cfg, [arm], [W_a], z0, label, tmp_path / f"alone{a}").stacked
        for together, lone in zip(stacked, alone):
            assert together.dtype == lone.dtype == torch.float64
            torch.testing.assert_close(together[a], lone[0], rtol=1e-9, atol=1e-9)
    assert not torch.allclose(stacked[-1][0], stacked[-1][2])     # the arms did train apart


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_stacked_arms_train_the_same_captured_as_a_cuda_graph(tmp_path):
    """On a GPU the default step is captured as a CUDA graph; capture refuses any host-to-device copy
    (an index built from a Python list is one), and the captured step must train what the eager one does."""
    torch.manual_seed(0)
    base = UNet(4, (16, 32), 1, 10, 8).cuda()
    pipe = SimpleNamespace(unet=base, cfg=ddpm.base_config(DataConfig(), "tiny"), device="cuda")
    g = torch.Generator().manual_seed(2)
    z0, label = torch.randn(64, 4, 8, 8, generator=g).cuda(), torch.randint(0, 10, (64,), generator=g).cuda()
    W = project_rows(torch.rand(64, 2, generator=g)).cuda()
    arms, envs = [invdiff.Arm("inferred", 1.0, 0), invdiff.Arm("inferred", 10.0, 1)], [W, W]
    common = {**invdiff.PRESETS["tiny"], "steps": 8, "ckpt_every": 8}
    runs = {graph: invdiff.train_arms(pipe, invdiff.InvDiffConfig(**common, cuda_graph=graph), arms, envs, z0,
                                      label, tmp_path / graph).stacked for graph in ("true", "false")}
    for captured, eager in zip(runs["true"], runs["false"]):
        torch.testing.assert_close(captured, eager, rtol=1e-3, atol=1e-5)
