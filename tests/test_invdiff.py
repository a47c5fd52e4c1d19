"""Tests for invdiff.py and invdiff_report.py: environment inference, the invariance objective and its
per-image weights, the authors' guidance module on a frozen model, the verdict rule, the spurious
colored MNIST, and a tiny end-to-end run (synthetic MNIST in torchvision's layout: it needs no data)."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the repo's flat modules without installing
import data  # noqa: E402
import ddpm  # noqa: E402
import invdiff  # noqa: E402
import invdiff_report  # noqa: E402
import vae  # noqa: E402
from idx import write_mnist  # noqa: E402  (tests/idx.py)
from environments import infer_environments, per_sample_losses, project_rows  # noqa: E402
from invdiff import Guided, build_module, environment_risks, invariance_loss, oracle_cells  # noqa: E402
from invdiff_report import auc, effective_weights, environment_row, verdict  # noqa: E402
from stack import Stacked  # noqa: E402
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


def tiny_unet(num_classes=3, seed=0):
    torch.manual_seed(seed)
    net = UNet(4, [8, 16], 1, num_classes, groups=4)
    torch.nn.init.normal_(net.out[-1].weight, std=0.1)       # a "trained" base: its output conv is no longer zero
    return net


# ------------------------------------------------------------------------- environment inference
@pytest.mark.parametrize("beta", [0.0, 3.0])
def test_environments_separate_two_loss_populations(beta):
    losses, population = two_populations()
    W = infer_environments(losses, 2, iters=500, lr=0.01, beta=beta, generator=torch.Generator().manual_seed(1))
    assert W.shape == (2000, 2) and on_simplex(W)
    high = int(((W[:, 1] > 0.5) == population.bool()).float().mean() > 0.5)    # the environment of the minority
    share = (W.argmax(1) == high).float()
    assert share[population == 1].mean() >= 0.95 and share[population == 0].mean() <= 0.05


def authors_optimize_weights(losses, K, generator, beta):
    """The authors' published environment step (src/group/train_group.py), written out again here."""
    w = torch.rand((len(losses), K), generator=generator).requires_grad_()
    opt = torch.optim.Adam([w], lr=0.01)
    for _ in range(500):
        opt.zero_grad()
        per_group = losses[:, None] * w
        mean = per_group.sum(0) / w.sum(0)
        loss = -torch.std(mean) - beta * torch.min(per_group)
        loss.backward()
        opt.step()
        w.data = torch.max(w.data, torch.tensor(0.0))
        w.data = w.data / torch.sum(w.data, dim=1, keepdim=True)
    return w.detach()


def test_environment_inference_is_the_authors_step():
    losses, _ = two_populations(400)
    ours = infer_environments(losses, 4, iters=500, lr=0.01, beta=3.0, generator=torch.Generator().manual_seed(7))
    theirs = authors_optimize_weights(losses, 4, torch.Generator().manual_seed(7), beta=3.0)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_projection_clamps_and_renormalises_rows():
    W = torch.tensor([[0.5, -0.5, 1.5], [-1.0, -2.0, -0.1], [0.2, 0.2, 0.6]])
    P = project_rows(W)
    assert torch.allclose(P[0], torch.tensor([0.25, 0.0, 0.75]))
    assert torch.allclose(P[1], torch.full((3,), 1 / 3))      # nothing left: uniform
    assert torch.allclose(P[2], W[2]) and on_simplex(P)


class Oracle(torch.nn.Module):
    """A base that predicts ε exactly up to an image-specific error, larger for `hard` images."""
    num_classes = 1

    def __init__(self, scheduler, z0, hard):
        super().__init__()
        self.scheduler, self.z0, self.hard = scheduler, z0, hard

    def forward(self, z_t, t, cond):
        a = self.scheduler._gather(t, z_t)
        eps = (z_t - a.sqrt() * self.z0[:len(z_t)]) / (1 - a).sqrt()
        return eps + torch.where(self.hard[:len(z_t), None, None, None], 1.0, 0.1)


def test_per_sample_loss_forms_equal_their_formulas():
    scheduler = ddpm.DDPMScheduler(num_train_timesteps=100)
    z0 = torch.randn(64, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    label, hard = torch.zeros(64, dtype=torch.long), torch.arange(64) < 8
    base = Oracle(scheduler, z0, hard)
    grid = per_sample_losses(base, scheduler, z0, label, form="eps-grid", draws=4, generator=torch.Generator().manual_seed(0))
    assert grid.mean().item() == pytest.approx(1.0, abs=1e-5) and grid[hard].min() > grid[~hard].max()
    raw = per_sample_losses(base, scheduler, z0, label, form="eps-grid", draws=4, normalise=False,
                            generator=torch.Generator().manual_seed(0))
    assert torch.allclose(raw, torch.where(hard, 1.0, 0.01), atol=1e-4)     # ‖ε̂ − ε‖² = error²
    # the authors' form: one t and ε per image drawn as below, ε̂ compared with the clean latent z_0
    gen = torch.Generator().manual_seed(5)
    t = torch.randint(0, 100, (64,), generator=gen)
    eps = torch.randn(z0.shape, generator=gen)
    eps_hat = base(scheduler.add_noise(z0, eps, t), t, label)
    expected = (eps_hat - z0).square().mean((1, 2, 3))
    authors = per_sample_losses(base, scheduler, z0, label, form="authors", generator=torch.Generator().manual_seed(5))
    assert torch.allclose(authors, expected, atol=1e-6)
    window = per_sample_losses(base, scheduler, z0, label, form="eps-window", window=(0, 10), draws=2,
                               generator=torch.Generator().manual_seed(0))
    assert torch.allclose(window, torch.where(hard, 1.0, 0.01), atol=1e-4)


def test_auc_counts_ties_half_and_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (60,), generator=gen).float()
    positive = torch.rand(60, generator=gen) < 0.3
    pos, neg = scores[positive], scores[~positive]
    brute = ((pos[:, None] > neg[None]).double() + 0.5 * (pos[:, None] == neg[None]).double()).mean().item()
    assert auc(scores, positive) == pytest.approx(brute)


def test_oracle_cells_of_celeba_are_four_environments():
    label, group = torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 1, 0, 1, 1])
    cells = oracle_cells(label, group, 2)
    assert cells.shape == (5, 4) and cells.sum(0).tolist() == [1, 1, 1, 2]


def test_arm_environments_pad_share_and_shuffle_within_each_class():
    gen = torch.Generator().manual_seed(0)
    label, group = torch.arange(60) % 3, torch.randint(0, 2, (60,), generator=gen)
    inferred = {0: project_rows(torch.rand(60, 4, generator=gen)), 1: project_rows(torch.rand(60, 4, generator=gen))}
    arms = [invdiff.Arm("erm", 0.0, 0), invdiff.Arm("inferred", 1.0, 0), invdiff.Arm("inferred", 0.0, 1),
            invdiff.Arm("random", 1.0, 1), invdiff.Arm("oracle", 1.0, 0), invdiff.Arm("oracle", 0.0, 1)]
    envs = invdiff.arm_environments(arms, inferred, oracle_cells(label, group, 2), label)
    assert all(W.shape == (60, 6) for W in envs)                                  # K_max = 3 classes × 2 groups
    assert torch.equal(envs[0][:, 0], torch.ones(60)) and envs[0][:, 1:].abs().sum() == 0
    assert torch.equal(envs[1][:, :4], inferred[0]) and torch.equal(envs[2][:, :4], inferred[1])
    assert envs[4] is envs[5]                                                     # one tensor, shared
    random, W = envs[3][:, :4], inferred[1]
    assert not torch.equal(random, W)
    for c in range(3):                                                            # the same rows within a class
        rows = lambda X: sorted(map(tuple, X[label == c].tolist()))  # noqa: E731
        assert rows(random) == rows(W)


def test_the_base_and_an_arm_at_r_zero_share_their_noise_and_samples():
    """The base at seed s and any arm of seed s start from one z_T; at r = 0 the arm is the base."""
    base = tiny_unet(10)
    cfg = ddpm.base_config(data.DataConfig(), "tiny")
    pipe = ddpm.Pipeline(cfg, IdentityVAE(), base, device="cpu")
    icfg = invdiff.InvDiffConfig(samples_per_class=3, sample_steps=4)
    arms = [invdiff.Arm("erm", 0.0, 1), invdiff.Arm("random", 1.0, 2)]
    stack = Stacked([Guided(base, build_module(base, cfg, "copy"))] * 2)
    stacked = invdiff.sample_stacked(pipe, stack, arms, icfg, 0.0, 2.0)           # [2, 30, 3, H, W]
    for a, seed in enumerate((1, 2)):
        alone = invdiff.sample_base(pipe, icfg, seed, 2.0)
        assert (stacked[a].int() - alone.int()).abs().max() <= 1
    assert (stacked[0].int() - stacked[1].int()).abs().max() > 1                 # seeds differ


class IdentityVAE(torch.nn.Module):
    """Latents are images: decode maps 4 channels to 3 in [0, 255] (enough to compare samples)."""
    def encode(self, x):
        return torch.distributions.Normal(torch.zeros(len(x), 4, 8, 8), 1.0)

    def decode_latents(self, z):
        return ((z[:, :3].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# ---------------------------------------------------------------- invariance objective and weights
def test_invariance_loss_equals_its_formula_and_stacks_over_arms():
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0])
    W = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    R0, R1 = (1 + 2 + 0.5 * 4) / 2.5, (3 + 0.5 * 4) / 1.5
    mean, var = (R0 + R1) / 2, (R0 - R1) ** 2 / 2               # unbiased variance of two values
    assert environment_risks(losses, W).tolist() == pytest.approx([R0, R1])
    assert invariance_loss(losses, W, 3.0).item() == pytest.approx(mean + 3 * var)
    W3 = torch.cat([W, torch.zeros(4, 1)], 1)                   # a padding environment is left out
    assert invariance_loss(losses, W3, 1.0).item() == pytest.approx(mean + var)
    # one row per arm, each its own λ and W: the same as the arms one by one
    arms_W = torch.stack([W3, torch.ones(4, 3) / 3]); arms_l = torch.stack([losses, losses.flip(0)])
    lam = torch.tensor([1.0, 5.0])
    stacked = invariance_loss(arms_l, arms_W, lam)
    assert torch.allclose(stacked, torch.stack([invariance_loss(arms_l[a], arms_W[a], lam[a]) for a in range(2)]))


@pytest.mark.parametrize("lam", [0.0, 1.0, 100.0])
def test_effective_weights_are_the_gradient_of_the_objective(lam):
    gen = torch.Generator().manual_seed(0)
    losses = torch.rand(50, generator=gen, dtype=torch.float64).requires_grad_()
    W = project_rows(torch.rand(50, 4, generator=gen, dtype=torch.float64))
    (grad,) = torch.autograd.grad(invariance_loss(losses, W, lam), losses)
    assert torch.allclose(effective_weights(losses.detach(), W, lam), grad, atol=1e-12)


def test_equal_size_environments_at_lambda_zero_weigh_every_image_one_over_n():
    N, K = 40, 4
    W = torch.nn.functional.one_hot(torch.arange(N) % K, K).double()              # K environments of N/K
    losses = torch.rand(N, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(effective_weights(losses, W, 0.0), torch.full((N,), 1 / N, dtype=torch.float64), atol=1e-15)
    v = effective_weights(losses, W, 1000.0)                                       # a large λ: some turn negative
    assert v.sum().item() == pytest.approx(1.0) and (v < 0).any()


def test_environment_row_reads_the_minority_weight_of_oracle_cells():
    label = torch.arange(100) % 2
    group = torch.where(torch.arange(100) < 80, label, 1 - label)                # 20 conflicting images
    cells, conflict = label * 2 + group, invdiff_report.conflicting(label, group)
    assert conflict.sum() == 20
    objective = torch.ones(100)
    row = environment_row(objective, torch.nn.functional.one_hot(cells).float(), cells, conflict, objective, [0.0])
    assert row["minority_share_lam0"] == pytest.approx(0.5) and row["purity"] == 1.0
    erm = environment_row(objective, torch.ones(100, 1), cells, conflict, objective, [0.0])
    assert erm["minority_share_lam0"] == pytest.approx(0.2)


# --------------------------------------------------------------------------------- guidance module
@pytest.mark.parametrize("form", ["convex", "additive"])
def test_zero_initialised_copy_gives_the_scaled_base_prediction(form):
    base = tiny_unet()
    module = build_module(base, ddpm.base_config(data.DataConfig(), "tiny"), "copy")
    assert count_parameters(module) == count_parameters(base)
    gen = torch.Generator().manual_seed(0)
    z, t, c = torch.randn(5, 4, 8, 8, generator=gen), torch.tensor([0, 10, 500, 900, 999]), torch.tensor([0, 1, 2, 3, 1])
    eps_theta = base(z, t, c)
    assert eps_theta.abs().sum() > 0
    out = Guided(base, module, form)(z, t, c, 0.5)
    assert torch.equal(out, (1 - 0.5) * eps_theta if form == "convex" else eps_theta)


def test_small_module_is_a_fraction_of_the_base():
    cfg = ddpm.base_config(data.DataConfig(), "small")
    base = ddpm.build_unet(cfg, 10)
    module = build_module(base, cfg, "small", 0.25)
    assert module.conv_in.out_channels == int(cfg.channels.split(",")[0]) // 4
    assert count_parameters(module) <= 0.25 * count_parameters(base)


# ----------------------------------------------------------------------------------------- verdict
def arms_from(draw):
    """The arms verdict reads, five seeds each, values from draw(name, seed)."""
    names = ["base", "inferred λ=0", "inferred λ=1", "random λ=1", "oracle λ=1"]
    return {name: {"Bias": [draw(name, s) for s in range(5)], "cond_acc": [0.9] * 5, "FID_C": [10.0] * 5}
            for name in names}


def test_verdict_refuses_arms_without_a_value_for_every_seed():
    arms = arms_from(lambda name, s: 0.5)
    arms["random λ=1"]["Bias"] = arms["random λ=1"]["Bias"][:4]
    with pytest.raises(ValueError, match="each of the base's seeds"):
        verdict(arms, 1.0, n_samples=500)


def test_verdict_does_not_pass_arms_drawn_from_one_distribution():
    gen = torch.Generator().manual_seed(0)
    same = arms_from(lambda name, s: 0.6 + 0.02 * torch.randn(1, generator=gen).item())
    v = verdict(same, 1.0, n_samples=500)
    assert not v["reduces"] and not v["helps"]


def test_verdict_does_not_count_differences_within_sampling_resolution():
    """Every seed agrees, but the drops (0.01) are below 2·√2/√(n·S) = 0.057 at n = 500, S = 5."""
    small = arms_from(lambda name, s: {"base": 0.60, "oracle λ=1": 0.59, "inferred λ=1": 0.59,
                                       "random λ=1": 0.60, "inferred λ=0": 0.60}[name])
    v = verdict(small, 1.0, n_samples=500)
    assert not v["reduces"] and not v["helps"]
    assert verdict(small, 1.0, n_samples=10 ** 6)["reduces"]        # with a fine enough resolution they count


def test_verdict_passes_a_clear_case_and_checks_quality():
    clear = arms_from(lambda name, s: {"base": 0.8, "oracle λ=1": 0.2, "inferred λ=1": 0.3,
                                       "random λ=1": 0.78, "inferred λ=0": 0.75}[name] + 0.005 * s)
    v = verdict(clear, 1.0, n_samples=500)
    assert v["reduces"] and v["helps"] and v["checks"]["reduces"]["share_of_oracle"] == pytest.approx(5 / 6)
    clear["inferred λ=1"]["FID_C"] = [20.0] * 5                                # 2× the base's FID-C
    assert not verdict(clear, 1.0, n_samples=500)["reduces"]


# ----------------------------------------------------------------------------------- spurious data
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


def test_spurious_cmnist_ties_color_to_the_digit_in_training_only(tmp_path):
    root = write_mnist(tmp_path / "data", bar_digits, 4000, 1000)
    cfg = data.DataConfig(dataset="cmnist", data_root=str(root), spurious=0.9)
    train, test = data.load(cfg, "train"), data.load(cfg, "test")
    majority = (train.group == train.label % 2).float()
    assert majority.mean().item() == pytest.approx(0.9, abs=0.02)
    assert train.group.float().mean().item() == pytest.approx(0.5, abs=0.03)        # no marginal imbalance
    assert (test.group == test.label % 2).float().mean().item() == pytest.approx(0.5, abs=0.05)
    with pytest.raises(ValueError, match="--spurious 0.9 applies to --dataset cmnist"):
        data.load(data.DataConfig(dataset="mnist-pair", data_root=str(root), spurious=0.9), "train")


def test_bad_flags_name_the_value():
    with pytest.raises(ValueError, match="env-loss 'nope'"):
        invdiff.check(invdiff.InvDiffConfig(env_loss="nope"))
    with pytest.raises(ValueError, match="unknown \\['dro'\\]"):
        invdiff.check(invdiff.InvDiffConfig(kinds="base,dro"))
    with pytest.raises(ValueError, match="--env-window '5,2'"):
        invdiff.check(invdiff.InvDiffConfig(env_window="5,2"))


# ------------------------------------------------------------------------------------ end to end
def finite(value, key=""):
    """Every number finite, except the AUC of the table's reference rows, which have no ℓ (NaN)."""
    if isinstance(value, dict):
        if value.get("form") in ("erm (one environment)", "oracle cells"):
            value = {k: v for k, v in value.items() if k != "auc"}
        return all(finite(v, k) for k, v in value.items())
    if isinstance(value, list):
        return all(finite(v, key) for v in value)
    return not isinstance(value, float) or math.isfinite(value) or key == "share_of_oracle"


def test_tiny_end_to_end_run_writes_the_table_the_arms_and_the_verdict(tmp_path, capsys, monkeypatch):
    """invdiff.py at the tiny preset, but its autoencoder trained 30 steps instead of 300: the run needs one
    to encode the latents, and nothing below reads its quality (the autoencoder's own training is tested
    in test_core.py)."""
    monkeypatch.setitem(vae.PRESETS, "tiny", {**vae.PRESETS["tiny"], "steps": 30, "ckpt_every": 30, "warmup": 3})
    root, runs = write_mnist(tmp_path / "data", bar_digits, 2400, 400), tmp_path / "runs"
    argv = ["--dataset", "cmnist", "--preset", "tiny", "--device", "cpu", "--runs", str(runs), "--data-root", str(root),
            "--steps", "10", "--samples-per-class", "4", "--env-iters", "50", "--table-envs", "2",
            "--lams", "0,1", "--sample-ratios", "0.5", "--report", str(tmp_path / "report")]
    invdiff.main(argv)
    out = tmp_path / "report"
    summary = json.loads((out / "metrics.json").read_text())
    assert finite(summary) and summary["config"]["spurious"] == 0.9            # the default spurious cmnist
    (setting,) = summary["settings"]
    names = ["base", "erm", "inferred λ=0", "inferred λ=1", "random λ=1", "oracle λ=0", "oracle λ=1"]
    assert list(setting["arms"]) == names and all(a["Bias"]["n"] == 2 for a in setting["arms"].values())
    forms = [(r["form"], r["K"]) for r in summary["environments"]["rows"]]
    assert forms[:3] == [("authors", 2), ("eps-grid", 2), ("eps-window", 2)] and forms[-1] == ("oracle cells", 20)
    report = (out / "report.md").read_text()
    assert report.index("Rule, fixed before the runs") < report.index("| arm |")
    said = "**InvDiff reduces Bias" if setting["verdict"]["reduces"] else "**InvDiff does not reduce Bias"
    assert said in report
    assert (out / "grids_r0.5_s2.png").exists() and (out / "loss.png").exists() and (out / "environments.md").exists()
    (run,) = (runs / "cmnist").glob("invdiff-*-base-*")
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(rows[-1]["arm_loss"]) == 12                                       # 6 arms × 2 seeds, one model
    # a rerun reuses the trained arms (the report folder is not part of their identity)
    stamp = (run / "ckpt.pt").stat().st_mtime_ns
    invdiff.main([*argv[:-1], str(tmp_path / "again"), "--train-only", "true"])
    assert (run / "ckpt.pt").stat().st_mtime_ns == stamp and not (tmp_path / "again" / "report.md").exists()
    # the environment stage alone writes the same table and nothing else
    invdiff.main([*argv[:-1], str(tmp_path / "envs"), "--stage", "environments"])
    assert json.loads((tmp_path / "envs" / "environments.json").read_text()) == json.loads(
        (out / "environments.json").read_text()) and not (tmp_path / "envs" / "report.md").exists()
