"""Tests for invdiff.py: environment inference, the invariance loss, the guidance module on a frozen
model, and a tiny end-to-end run (synthetic MNIST in torchvision's layout, so it needs no data)."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the repo's flat modules without installing
import ddpm  # noqa: E402
import invdiff  # noqa: E402
import train as train_lib  # noqa: E402
from idx import write_mnist  # noqa: E402  (tests/idx.py)
from invdiff import (ArmConfig, build_module, environment_risks, environment_table, guided_prediction,  # noqa: E402
                     infer_environments, invariance_loss, per_sample_losses, project_rows, train_module)
from unet import UNet, count_parameters  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared CPU OpenMP's spin-waits make two far slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def two_populations(n=2000, seed=0):
    """80% of the losses near 0.1, 20% near 0.5 (shuffled); -> (losses [n], population [n])."""
    gen = torch.Generator().manual_seed(seed)
    n0 = int(0.8 * n)
    losses = torch.cat([0.1 + 0.02 * torch.randn(n0, generator=gen), 0.5 + 0.05 * torch.randn(n - n0, generator=gen)])
    population = torch.cat([torch.zeros(n0, dtype=torch.long), torch.ones(n - n0, dtype=torch.long)])
    order = torch.randperm(n, generator=gen)
    return losses.clamp_min(0)[order], population[order]


def on_simplex(W):
    return bool((W >= 0).all()) and torch.allclose(W.sum(1), torch.ones(len(W)), atol=1e-5)


def tiny_unet(num_classes=3, seed=0, nonzero_output=True):
    torch.manual_seed(seed)
    net = UNet(4, [8, 16], 1, num_classes, groups=4)
    if nonzero_output:  # a "trained" base: its output conv is no longer zero
        torch.nn.init.normal_(net.out[-1].weight, std=0.1)
    return net


# ------------------------------------------------------------------------- environment inference
@pytest.mark.parametrize("K", [2, 4])
def test_environments_separate_two_loss_populations(K):
    losses, population = two_populations()
    W = infer_environments(losses, K, iters=500, lr=0.01, generator=torch.Generator().manual_seed(1))
    assert W.shape == (2000, K) and on_simplex(W)
    table = environment_table(W, population, losses)
    assert table["purity"] >= 0.95 and table["majority_share"] == pytest.approx(0.8)
    if K == 2:  # the high-loss environment is the minority population
        high = max(range(2), key=lambda k: table["R"][k])
        assert table["confusion"][high][1] >= 0.95 * 400 and table["R"][high] > 0.4


def test_environments_from_random_losses_are_not_informative():
    """Control: losses unrelated to the population give purity near the majority share."""
    _, population = two_populations()
    losses = torch.rand(2000, generator=torch.Generator().manual_seed(3))
    W = infer_environments(losses, 2, generator=torch.Generator().manual_seed(1))
    assert environment_table(W, population, losses)["purity"] < 0.85


def test_projection_clamps_and_renormalises_rows():
    W = torch.tensor([[0.5, -0.5, 1.5], [-1.0, -2.0, -0.1], [0.2, 0.2, 0.6]])
    P = project_rows(W)
    assert torch.allclose(P[0], torch.tensor([0.25, 0.0, 0.75]))
    assert torch.allclose(P[1], torch.full((3,), 1 / 3))      # nothing left: uniform
    assert torch.allclose(P[2], W[2]) and on_simplex(P)


def test_per_sample_loss_is_normalised_per_timestep_and_ranks_images():
    """A base that predicts ε exactly up to image-specific noise: ℓ ranks the noisy images high, and
    the mean over images of the per-t-normalised loss is exactly 1."""
    scheduler = ddpm.DDPMScheduler(num_train_timesteps=100)
    z0 = torch.randn(64, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    label = torch.zeros(64, dtype=torch.long)
    hard = torch.arange(64) < 8                                 # 8 "minority" images

    class Oracle(torch.nn.Module):                             # ε̂ = ε + error, error larger for `hard`
        num_classes = 1

        def forward(self, z_t, t, cond):
            a = scheduler._gather(t, z_t)
            eps = (z_t - a.sqrt() * z0[:len(z_t)]) / (1 - a).sqrt()
            return eps + torch.where(hard[:len(z_t), None, None, None], 1.0, 0.1)

    losses = per_sample_losses(Oracle(), scheduler, z0, label, draws=4, generator=torch.Generator().manual_seed(0))
    assert losses.shape == (64,) and losses.mean().item() == pytest.approx(1.0, abs=1e-5)
    assert losses[hard].min() > losses[~hard].max()
    authors = per_sample_losses(Oracle(), scheduler, z0, label, form="authors", generator=torch.Generator().manual_seed(0))
    assert authors.shape == (64,) and not torch.allclose(authors.mean(), torch.tensor(1.0))  # unnormalised, vs z_0


# ---------------------------------------------------------------------------- invariance objective
def test_invariance_loss_equals_its_formula():
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0])
    W = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    R0, R1 = (1 + 2 + 0.5 * 4) / 2.5, (3 + 0.5 * 4) / 1.5    # 2.0 and 10/3
    mean, var = (R0 + R1) / 2, (R0 - R1) ** 2 / 2               # unbiased variance of two values
    assert environment_risks(losses, W).tolist() == pytest.approx([R0, R1])
    assert invariance_loss(losses, W, 1.0).item() == pytest.approx(mean + var)
    assert invariance_loss(losses, W, 3.0).item() == pytest.approx(mean + 3 * var)
    # an environment without weight in the batch is left out (not a zero risk)
    W3 = torch.cat([W, torch.zeros(4, 1)], 1)
    assert invariance_loss(losses, W3, 1.0).item() == pytest.approx(mean + var)


def test_invariance_loss_with_one_environment_is_the_mean_loss():
    losses = torch.rand(16, generator=torch.Generator().manual_seed(0))
    assert invariance_loss(losses, torch.ones(16, 1), lam=5.0).item() == pytest.approx(losses.mean().item())


def test_invariance_loss_with_lambda_zero_has_the_weighted_mse_gradient():
    gen = torch.Generator().manual_seed(0)
    pred = torch.randn(8, 4, 2, 2, generator=gen, requires_grad=True)
    target = torch.randn(8, 4, 2, 2, generator=gen)
    W = project_rows(torch.rand(8, 3, generator=gen))

    def per_sample(p):
        return (p - target).square().mean((1, 2, 3))

    (g_inv,) = torch.autograd.grad(invariance_loss(per_sample(pred), W, lam=0.0), pred)
    v = (W / W.sum(0)).mean(1)                                  # weighted MSE: Σ_i v_i ℓ_i
    (g_mse,) = torch.autograd.grad((v * per_sample(pred)).sum(), pred)
    assert torch.allclose(g_inv, g_mse, atol=1e-7)
    (g_var,) = torch.autograd.grad(invariance_loss(per_sample(pred), W, lam=1.0), pred)
    assert not torch.allclose(g_var, g_mse, atol=1e-5)          # the variance term does change it


# --------------------------------------------------------------------------------- guidance module
def test_module_is_a_quarter_width_and_at_most_a_quarter_of_the_parameters():
    for preset in ("small", "full"):
        cfg = ddpm.base_config(ddpm.data.DataConfig(), preset)
        base, module = ddpm.build_unet(cfg, 10), build_module(cfg, 10, 0.25)
        assert module.conv_in.out_channels == int(cfg.channels.split(",")[0]) // 4
        assert count_parameters(module) <= 0.25 * count_parameters(base)
    tiny = ddpm.base_config(ddpm.data.DataConfig(), "tiny")
    assert count_parameters(build_module(tiny, 10)) <= 0.25 * count_parameters(ddpm.build_unet(tiny, 10))


@pytest.mark.parametrize("form", ["convex", "additive"])
def test_zero_initialised_module_gives_the_scaled_base_prediction(form):
    base, module = tiny_unet(), build_module(ddpm.base_config(ddpm.data.DataConfig(), "tiny"), 3)
    gen = torch.Generator().manual_seed(0)
    z, t, c = torch.randn(5, 4, 8, 8, generator=gen), torch.tensor([0, 10, 500, 900, 999]), torch.tensor([0, 1, 2, 3, 1])
    eps_theta = base(z, t, c)
    assert eps_theta.abs().sum() > 0
    out = guided_prediction(base, module, z, t, c, r=0.8, form=form)
    assert torch.equal(out, (1 - 0.8) * eps_theta if form == "convex" else eps_theta)


def test_one_step_changes_only_the_module(tmp_path):
    base, module = tiny_unet(), build_module(ddpm.base_config(ddpm.data.DataConfig(), "tiny"), 3)
    before_base = {k: v.clone() for k, v in base.state_dict().items()}
    before_module = {k: v.clone() for k, v in module.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    z0, label = torch.randn(32, 4, 8, 8, generator=gen), torch.randint(0, 3, (32,), generator=gen)
    W = project_rows(torch.rand(32, 2, generator=gen))
    cfg = ArmConfig(steps=1, batch_size=8, warmup=1, ckpt_every=1, arm="invdiff")
    train_module(base, module, ddpm.DDPMScheduler(), z0, label, W, cfg, tmp_path)
    assert all(torch.equal(before_base[k], v) for k, v in base.state_dict().items())
    assert all(not p.requires_grad for p in base.parameters()) and not base.training
    changed = [k for k, v in module.state_dict().items() if not torch.equal(before_module[k], v)]
    assert "out.2.weight" in changed and (tmp_path / "ckpt.pt").exists()


def test_bad_flags_name_the_value():
    with pytest.raises(ValueError, match="env-loss 'nope'"):
        invdiff.check(invdiff.InvDiffConfig(env_loss="nope"))
    with pytest.raises(ValueError, match="unknown \\['dro'\\]"):
        invdiff.check(invdiff.InvDiffConfig(arms="base,dro"))


# ------------------------------------------------------------------------------------ end to end
def bar_digits(n: int, seed: int):
    """Synthetic digits: digit k is a bar at a k-dependent place (rows for 0-4, columns for 5-9)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    images = torch.zeros(n, 28, 28, dtype=torch.uint8)
    for i, k in enumerate(labels.tolist()):
        at = 3 + 5 * (k % 5) + int(torch.randint(-1, 2, (1,), generator=gen))
        if k < 5:
            images[i, at:at + 3, 4:24] = 220
        else:
            images[i, 4:24, at:at + 3] = 220
    return images, labels


def finite(value):
    if isinstance(value, dict):
        return all(finite(v) for v in value.values())
    if isinstance(value, list):
        return all(finite(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


def test_tiny_end_to_end_run_reports_every_arm(tmp_path, capsys, monkeypatch):
    root, runs = write_mnist(tmp_path / "data", bar_digits, 2400, 400), tmp_path / "runs"
    stages, check = [], train_lib.check_train_config           # train() checks the config of every stage
    monkeypatch.setattr(train_lib, "check_train_config", lambda cfg: stages.append(cfg) or check(cfg))
    invdiff.main(["--dataset", "cmnist", "--preset", "tiny", "--device", "cpu", "--runs", str(runs),
                  "--data-root", str(root), "--steps", "20", "--samples-per-class", "6", "--env-iters", "100",
                  "--cuda-graph", "true"])       # (a no-op on CPU) reaches the autoencoder, base and module
    assert [type(cfg).__name__ for cfg in stages][:2] == ["VAEConfig", "DiffusionConfig"] and len(stages) == 6
    assert all(cfg.cuda_graph for cfg in stages)
    out = runs / "cmnist" / "invdiff"
    metrics = json.loads((out / "metrics.json").read_text())
    assert [arm["name"] for arm in metrics["arms"]] == list(invdiff.ARMS)
    assert finite(metrics)
    for arm in metrics["arms"]:
        assert {"Bias_mean", "Bias_std", "FD_half_l1", "FID_C", "cond_acc"} <= set(arm), arm["name"]
        assert arm["n"] == 60 and set(arm["Bias_per_class"]) == {str(c) for c in range(10)}
    assert metrics["parameters"]["module"] <= 0.25 * metrics["parameters"]["base"]
    env = json.loads((out / "environments.json").read_text())
    assert len(env["confusion"]) == 2 and sum(map(sum, env["confusion"])) == 2000
    report = (out / "report.md").read_text()
    assert all(f"| {name} |" in report for name in invdiff.ARMS) and "Inferred environments" in report
    assert (out / "environments.md").exists() and (out / "samples.png").exists()
    assert all((out / f"samples_{name}.png").exists() for name in invdiff.ARMS)
    assert len(list((runs / "cmnist").glob("invdiff-*-*/ckpt.pt"))) == 4     # the four trained arms
    assert "| arm |" in capsys.readouterr().out                              # the final table is printed
    # an arm's run dir does not depend on which arms run with it: a --train-only rerun reuses it
    stamps = {p: p.stat().st_mtime_ns for p in (runs / "cmnist").glob("invdiff-*-*/ckpt.pt")}
    report = (out / "metrics.json").stat().st_mtime_ns
    invdiff.main(["--dataset", "cmnist", "--preset", "tiny", "--device", "cpu", "--runs", str(runs),
                  "--data-root", str(root), "--steps", "20", "--env-iters", "100", "--arms", "oracle",
                  "--train-only", "true"])
    assert {p: p.stat().st_mtime_ns for p in (runs / "cmnist").glob("invdiff-*-*/ckpt.pt")} == stamps
    assert (out / "metrics.json").stat().st_mtime_ns == report                # no sampling, no report
    # --report writes elsewhere and is not part of an arm's identity: the trained arm is reused
    invdiff.main(["--dataset", "cmnist", "--preset", "tiny", "--device", "cpu", "--runs", str(runs),
                  "--data-root", str(root), "--steps", "20", "--samples-per-class", "6", "--env-iters", "100",
                  "--arms", "base,oracle", "--report", str(tmp_path / "other")])
    assert {p: p.stat().st_mtime_ns for p in (runs / "cmnist").glob("invdiff-*-*/ckpt.pt")} == stamps
    other = json.loads((tmp_path / "other" / "metrics.json").read_text())
    assert [arm["name"] for arm in other["arms"]] == ["base", "oracle"]
    assert (out / "metrics.json").stat().st_mtime_ns == report
