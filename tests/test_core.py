"""Tests for the core: schedules and samplers (ddpm.py), the UNet, the autoencoder (vae.py) and its
stage's exact resume, the datasets (data.py), the base model end to end, and the command lines'
one-line errors on bad input. The training loop itself is tested in test_train.py.

Every test runs on CPU in seconds with tiny models. MNIST is a synthetic stand-in written in
torchvision's raw IDX layout (and the real one when FAIRDIFF_DATA has it); CelebA is a tiny folder
of JPEGs in the real layout."""
import math
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the repo's flat modules without installing
import cli  # noqa: E402  (tests/cli.py)
import data  # noqa: E402
import ddpm  # noqa: E402
import vae  # noqa: E402
from data import DataConfig  # noqa: E402
from ddpm import DDIMScheduler, DDPMScheduler, drop_labels, sample_latents  # noqa: E402
from config import comparable, config_hash  # noqa: E402
from datafiles import save_cache  # noqa: E402
from unet import UNet  # noqa: E402
from idx import write_mnist  # noqa: E402  (tests/idx.py)
from test_train import assert_same_state, load  # noqa: E402

torch.set_num_threads(1)   # tiny models: more threads only spin on a shared CPU
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")
REAL_ROOT = os.environ.get("FAIRDIFF_DATA", "")
HAVE_MNIST = bool(REAL_ROOT) and all(
    (Path(REAL_ROOT) / "MNIST" / "raw" / f).exists() or (Path(REAL_ROOT) / "MNIST" / "raw" / f"{f}.gz").exists()
    for f in data.MNIST_FILES)
needs_mnist = pytest.mark.skipif(not HAVE_MNIST, reason="real MNIST not found: set FAIRDIFF_DATA to the data root")


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------ fixtures
def synthetic_mnist(n, seed):
    """uint8 [n, 28, 28] textured blobs and skewed digit labels [n] (digit k has weight k + 1)."""
    g = gen(seed)
    labels = torch.multinomial(torch.arange(1.0, 11.0), n, replacement=True, generator=g)
    images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
    images[:, :, :6] = 0                                       # a black margin, like MNIST's
    return images, labels


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory):
    return write_mnist(tmp_path_factory.mktemp("mnist"), synthetic_mnist, 2400, 400)


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CACHE_DIR", tmp_path / "cache")   # read at import; never ./runs/cache


def tiny_unet(seed=0, num_classes=2):
    torch.manual_seed(seed)
    return UNet(4, (8, 16), num_res_blocks=1, num_classes=num_classes, groups=4)


# ===================================================================== schedules and samplers
def test_add_noise_matches_iterating_the_one_step_forward_process():
    """q(z_t | z_0) in closed form == t+1 steps of z_s = √(1−β_s) z_{s−1} + √β_s ε (t ∈ [0, T−1]).
    Large betas (T = 10) so an off-by-one in t or a wrong √ would show."""
    sched = DDPMScheduler(num_train_timesteps=10, beta_schedule="linear", beta_start=0.05, beta_end=0.3)
    x0 = torch.tensor([-2.0, 0.5, 3.0], dtype=torch.float64)
    n = 200_000
    for t in (0, 4, 9):
        g = gen(t)
        z = x0.expand(n, 3).clone()                                          # [n, 3]
        for s in range(t + 1):
            beta = sched.betas[s]
            z = (1 - beta).sqrt() * z + beta.sqrt() * torch.randn(n, 3, generator=g, dtype=torch.float64)
        direct = sched.add_noise(x0.float().expand(n, 3), torch.randn(n, 3, generator=g),
                                 torch.full((n,), t)).double()
        a = float(sched.alphas_cumprod[t])
        for x in (z, direct):
            assert torch.allclose(x.mean(0), a ** 0.5 * x0, atol=0.015), t
            assert torch.allclose(x.var(0), torch.full((3,), 1 - a, dtype=torch.float64), rtol=0.03), t
        assert torch.allclose(z.mean(0), direct.mean(0), atol=0.015)


@pytest.mark.parametrize("schedule", ddpm.BETA_SCHEDULES)
def test_alphas_cumprod_strictly_decreasing_in_open_unit_interval(schedule):
    sched = DDPMScheduler(beta_schedule=schedule)
    a = sched.alphas_cumprod
    assert len(a) == 1000
    assert ((sched.betas > 0) & (sched.betas < 1)).all()
    assert ((a > 0) & (a < 1)).all()
    assert (a.diff() < 0).all()
    assert torch.allclose(a, torch.cumprod(1 - sched.betas, 0))


def test_unknown_beta_schedule_and_prediction_type_raise():
    with pytest.raises(ValueError, match="unknown beta schedule 'quadratic'"):
        DDPMScheduler(beta_schedule="quadratic")
    with pytest.raises(ValueError, match="unknown prediction type 'x0'"):
        DDPMScheduler(prediction_type="x0")


def bayes_posterior(a_t, a_prev, x0, z_t):
    """q(z_t' | z_t, z_0) ∝ N(z_t; √(ᾱ_t/ᾱ_t') z_t', 1 − ᾱ_t/ᾱ_t') · N(z_t'; √ᾱ_t' z_0, 1 − ᾱ_t'):
    a product of Gaussians in z_t', so precisions add and the mean is the precision-weighted sum."""
    c, v_step, v_prior = math.sqrt(a_t / a_prev), 1 - a_t / a_prev, 1 - a_prev
    var = 1 / (c ** 2 / v_step + 1 / v_prior)
    return var * (c * z_t / v_step + math.sqrt(a_prev) * x0 / v_prior), var


def test_ddpm_posterior_matches_bayes_in_float64():
    sched = DDPMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    sched.set_timesteps(10)
    g = gen(0)
    x0, z_t = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    pairs = [(int(t), sched.previous(t)) for t in sched.timesteps[:-1]] + [(500, 499), (1, 0)]
    for t, prev in pairs:
        a_t, a_prev = float(sched.alphas_cumprod[t]), float(sched.alphas_cumprod[prev])
        mean, var = sched.posterior(x0, z_t, t, prev)
        want_mean, want_var = bayes_posterior(a_t, a_prev, x0, z_t)
        assert torch.allclose(mean, want_mean, rtol=1e-10, atol=1e-12), (t, prev)
        assert var == pytest.approx(want_var, rel=1e-10), (t, prev)
    mean, var = sched.posterior(x0, z_t, 99, -1)                 # the last step: ᾱ_{−1} = 1 -> z_0 itself
    assert torch.allclose(mean, x0) and var == 0


def test_ddpm_step_last_is_posterior_mean_and_earlier_steps_add_posterior_noise():
    sched = DDPMScheduler()
    sched.set_timesteps(10)
    g = gen(0)
    out, sample = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = int(sched.timesteps[-1])
    a = float(sched.alphas_cumprod[t])
    x0_hat = (sample - math.sqrt(1 - a) * out) / math.sqrt(a)
    last = sched.step(out, t, sample, generator=gen(1))
    assert torch.equal(last, sched.step(out, t, sample, generator=gen(2)))   # no noise at the end
    assert torch.allclose(last, sched.posterior(x0_hat, sample, t, -1)[0], atol=1e-5)
    assert torch.allclose(last, x0_hat, atol=1e-4)
    # earlier: mean + σ·noise with σ² the posterior variance
    t = int(sched.timesteps[0])
    out, sample = torch.randn(200_000, generator=g), torch.randn(200_000, generator=g)
    x0_hat, _ = sched.split_output(out, t, sample)
    mean, var = sched.posterior(x0_hat, sample, t, sched.previous(t))
    residual = sched.step(out, t, sample, generator=gen(3)) - mean
    assert abs(residual.mean()) < 0.01
    assert residual.var().item() == pytest.approx(var, rel=0.03)


def test_set_timesteps_trailing_starts_at_T_minus_1_and_prev_comes_from_the_list():
    sched = DDIMScheduler(num_train_timesteps=1000)
    for n in (1, 3, 10, 50, 1000):
        sched.set_timesteps(n)
        ts = sched.timesteps.tolist()
        assert ts[0] == 999 and len(ts) == n and len(set(ts)) == n
        assert all(a > b for a, b in zip(ts, ts[1:])) and ts[-1] >= 0
        assert sched.prev_timesteps.tolist() == ts[1:] + [-1]
        assert [sched.previous(t) for t in ts] == ts[1:] + [-1]
    sched.set_timesteps(1000)
    assert sched.timesteps.tolist() == list(range(999, -1, -1))
    # T/n not an integer: the list is [999, 666, 332]; a stride formula would say 666 -> 333
    sched.set_timesteps(3)
    assert sched.timesteps.tolist() == [999, 666, 332]
    x0, eps = torch.randn(2, 4, 4, 4, generator=gen(0)), torch.randn(2, 4, 4, 4, generator=gen(1))
    a, a_prev = sched.alphas_cumprod[666].item(), sched.alphas_cumprod[332].item()
    z_t = math.sqrt(a) * x0 + math.sqrt(1 - a) * eps
    assert torch.allclose(sched.step(eps, 666, z_t), math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps, atol=1e-5)
    for bad in (0, 1001):
        with pytest.raises(ValueError, match=f"{bad} sampling steps"):
            sched.set_timesteps(bad)


def test_ddim_eta_0_is_deterministic_and_eta_1_is_not():
    out, sample = torch.randn(2, 4, 8, 8, generator=gen(0)), torch.randn(2, 4, 8, 8, generator=gen(1))
    ddim = DDIMScheduler(eta=0.0)
    ddim.set_timesteps(10)
    t = int(ddim.timesteps[3])
    assert torch.equal(ddim.step(out, t, sample, generator=gen(1)), ddim.step(out, t, sample, generator=gen(2)))
    noisy = DDIMScheduler(eta=1.0)
    noisy.set_timesteps(10)
    assert not torch.allclose(noisy.step(out, t, sample, generator=gen(1)), noisy.step(out, t, sample, generator=gen(2)))


def oracle(sched, x0):
    """A 'model' that knows z_0: returns the true ε (or v) for whatever z_t it is given."""
    def model(z, t, cond):
        a = sched.alphas_cumprod[t].float().view(-1, 1, 1, 1)             # [B, 1, 1, 1]
        eps = (z - a.sqrt() * x0) / (1 - a).sqrt()
        return eps if sched.prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
    return model


@pytest.mark.parametrize("prediction_type", ddpm.PREDICTION_TYPES)
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sampler_given_the_true_noise_recovers_x0(sampler, prediction_type):
    kw = dict(beta_schedule="scaled_linear", prediction_type=prediction_type)
    sched = DDIMScheduler(eta=0.0, **kw) if sampler == "ddim" else DDPMScheduler(**kw)
    sched.set_timesteps(10)
    x0 = torch.randn(3, 4, 8, 8, generator=gen(5))
    z0 = sample_latents(oracle(sched, x0), sched, 3, (4, 8, 8), generator=gen(6))
    assert torch.allclose(z0, x0, atol=1e-4)


def test_ddim_eta_0_with_the_true_noise_walks_the_forward_process_backwards():
    """Every DDIM (η = 0) step with the true ε lands on z_t' = √ᾱ_t' x0 + √(1−ᾱ_t') ε, same ε."""
    sched = DDIMScheduler(eta=0.0)
    sched.set_timesteps(7)
    x0, eps = torch.randn(3, 4, 8, 8, generator=gen(0)), torch.randn(3, 4, 8, 8, generator=gen(1))
    z = sched.add_noise(x0, eps, torch.full((3,), int(sched.timesteps[0])))
    for t in sched.timesteps.tolist():
        z = sched.step(oracle(sched, x0)(z, torch.full((3,), t), None), t, z)
        prev = sched.previous(t)
        want = x0 if prev < 0 else sched.add_noise(x0, eps, torch.full((3,), prev))
        assert torch.allclose(z, want, atol=1e-4), t


def test_add_noise_at_t0_is_about_x0_and_at_T_minus_1_about_noise():
    sched = DDPMScheduler()
    x0, noise = torch.randn(64, 4, 8, 8, generator=gen(0)), torch.randn(64, 4, 8, 8, generator=gen(1))
    z = sched.add_noise(x0, noise, torch.zeros(64, dtype=torch.long))
    assert (z - x0).pow(2).mean().sqrt() < 0.05
    z = sched.add_noise(x0, noise, torch.full((64,), 999))
    assert torch.corrcoef(torch.stack([z.flatten(), x0.flatten()]))[0, 1].abs() < 0.1
    v = sched.get_velocity(x0, noise, torch.full((64,), 500))   # v = √ᾱ ε − √(1−ᾱ) x0 splits back
    x0_back, eps_back = DDPMScheduler(prediction_type="v_prediction").split_output(
        v, torch.full((64,), 500), sched.add_noise(x0, noise, torch.full((64,), 500)))
    assert torch.allclose(x0_back, x0, atol=1e-4) and torch.allclose(eps_back, noise, atol=1e-4)


def test_drop_labels_uses_the_null_class_at_rate_p():
    label = torch.zeros(20_000, dtype=torch.long)
    dropped = drop_labels(label, 10, 0.1, gen(0))
    assert set(dropped.unique().tolist()) == {0, 10}
    assert (dropped == 10).float().mean().item() == pytest.approx(0.1, abs=0.01)


# ==================================================================================== UNet
@pytest.mark.parametrize("size", [8, 16])
def test_unet_keeps_the_shape_and_starts_at_exactly_zero(size):
    net = tiny_unet(num_classes=3)
    z, t = torch.randn(2, 4, size, size, generator=gen(0)), torch.tensor([0, 999])
    for cond in (None, torch.tensor([0, 2])):
        out = net(z, t, cond)
        assert out.shape == z.shape
        assert torch.equal(out, torch.zeros_like(z))              # zero-initialised output conv


def test_unet_null_class_is_used_when_cond_is_none():
    net = tiny_unet(num_classes=3)
    with torch.no_grad():                                          # leave the zero init: a generic network
        for p in net.parameters():
            p.normal_(0, 0.2, generator=gen(1))
    z, t = torch.randn(2, 4, 8, 8, generator=gen(0)), torch.tensor([10, 500])
    with torch.no_grad():
        uncond = net(z, t, None)
        assert torch.equal(uncond, net(z, t, torch.full((2,), 3)))
        assert not torch.allclose(uncond, net(z, t, torch.zeros(2, dtype=torch.long)))
        net.class_emb.weight[0] += 1.0                             # class 0's row is not the null one
        assert torch.equal(uncond, net(z, t, None))
        net.class_emb.weight[3] += 1.0                             # the null row (index K) is
        assert not torch.allclose(uncond, net(z, t, None))


# ============================================================================= autoencoder
def test_vae_overfits_a_tiny_batch():
    """8 mostly-black images with colored bars: the reconstruction error must fall well below that of
    the all-background image (where an L1-only loss stalls for hundreds of steps)."""
    torch.manual_seed(0)
    model = vae.build(vae.VAEConfig(channels="16,32,32"))
    x = -torch.ones(8, 3, 32, 32)                                  # [8, 3, 32, 32] in [-1, 1]
    for i in range(8):
        x[i, i % 3, 4 + 2 * i:12 + 2 * i, 6:26 - i] = 1.0
        x[i, (i + 1) % 3, 20:28, 3 * i:3 * i + 5] = 0.0
    background = (x + 1).abs().mean().item()                       # about 0.107
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def recon_l1():
        with torch.no_grad():
            return (model.decode(model.encode(x).mode()) - x).abs().mean().item()

    start = recon_l1()
    g = gen(0)
    for _ in range(200):
        loss = model(x, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = recon_l1()
    assert model.encode(x).mean.shape == (8, 4, 8, 8)              # f = 4: 32 px -> 8x8 latents
    assert end < 0.5 * background and end < 0.1 * start, (background, start, end)


def test_diagonal_gaussian_kl_mode_and_sample():
    g = gen(0)
    moments = torch.cat([torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g) * 2], dim=1)
    post = vae.DiagonalGaussian(moments)
    q = torch.distributions.Normal(moments[:, :4].double(), (0.5 * moments[:, 4:].double()).exp())
    want = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(dim=(1, 2, 3))
    assert post.kl().shape == (3,)
    assert torch.allclose(post.kl().double(), want, rtol=1e-5)
    assert torch.equal(post.mode(), moments[:, :4])
    assert torch.equal(post.sample(gen(1)), post.sample(gen(1)))
    wide = vae.DiagonalGaussian(torch.cat([torch.full((1, 1, 200, 200), 1.5),               # μ = 1.5
                                           torch.full((1, 1, 200, 200), math.log(0.25))], 1))  # σ = 0.5
    s = wide.sample(gen(2))
    assert s.mean().item() == pytest.approx(1.5, abs=0.01) and s.std().item() == pytest.approx(0.5, abs=0.01)


# ================================================================================= datasets
def source_of(channel: torch.Tensor, gray: torch.Tensor) -> torch.Tensor:
    """For images [n, H, W], the index of the identical image in gray [N, H, W] (-1 if none)."""
    w = torch.randint(1, 2 ** 20, (gray[0].numel(),), generator=gen(0))
    key = lambda x: (x.reshape(len(x), -1).long() * w).sum(1)    # noqa: E731
    lookup = {k: i for i, k in enumerate(key(gray).tolist())}
    idx = torch.tensor([lookup.get(k, -1) for k in key(channel).tolist()])
    found = idx >= 0
    assert torch.equal(gray[idx[found]], channel[found])          # a real match, not a hash collision
    return idx


def check_cmnist(cfg, split_name, gray, digits, bias, tv_bound):
    s = data.load(cfg, split_name)
    n = len(s)
    assert s.images.dtype == torch.uint8 and s.images.shape == (n, 3, 32, 32)
    share0 = (s.group == 0).float().mean().item()
    assert abs(share0 - bias) <= 1 / n                             # the share is the bias, to one image
    red, green = s.group == 0, s.group == 1                        # colors "red,green"
    assert (s.images[red][:, 1:] == 0).all() and (s.images[green][:, [0, 2]] == 0).all()
    intensity = torch.where(red[:, None, None], s.images[:, 0], s.images[:, 1])   # [n, 32, 32]
    src = source_of(intensity, gray)
    assert (src >= 0).all()                                        # R (or G) is exactly a source digit
    assert len(src.unique()) == n                                  # each source used once
    assert torch.equal(s.label, digits[src])
    overall = torch.bincount(s.label, minlength=10).float() / n
    for k in (0, 1):
        within = torch.bincount(s.label[s.group == k], minlength=10).float() / (s.group == k).sum()
        assert 0.5 * (within - overall).abs().sum() < tv_bound    # digits keep their distribution
    return s


def padded_mnist(root, train):
    ds = torchvision.datasets.MNIST(root, train=train)
    return F.pad(ds.data, (2,) * 4), ds.targets


def test_cmnist_synthetic_bias_colors_digits_and_balanced_test(mnist_root):
    gray, digits = padded_mnist(mnist_root, True)
    for bias in (0.8, 0.95, 0.5):
        cfg = DataConfig(data_root=str(mnist_root), bias=bias, n_train=2000)
        check_cmnist(cfg, "train", gray, digits, bias, tv_bound=0.2)
    gray, digits = padded_mnist(mnist_root, False)
    test = check_cmnist(DataConfig(data_root=str(mnist_root), bias=0.95), "test", gray, digits, 0.5, tv_bound=0.2)
    assert len(test) == 400 and (test.group == 0).sum() == 200      # the whole held-out set, 50/50


def test_mnist_pair_synthetic(mnist_root):
    gray, digits = padded_mnist(mnist_root, True)
    cfg = DataConfig(dataset="mnist-pair", data_root=str(mnist_root), bias=0.8, digits="7,8")
    s = data.load(cfg, "train")
    assert abs((s.group == 0).float().mean().item() - 0.8) <= 1 / len(s)
    assert torch.equal(s.images[:, 0], s.images[:, 1]) and torch.equal(s.images[:, 0], s.images[:, 2])  # gray
    src = source_of(s.images[:, 0], gray)
    assert (src >= 0).all() and torch.equal(digits[src], torch.tensor([7, 8])[s.group])
    assert torch.equal(s.label, s.group) and s.num_classes == 2
    test = data.load(cfg, "test")
    assert (test.group == 0).sum() == (test.group == 1).sum() > 0
    with pytest.raises(ValueError, match="--digits '7,7'"):
        data.load(DataConfig(dataset="mnist-pair", data_root=str(mnist_root), digits="7,7"), "train")


def test_same_seed_same_dataset(mnist_root):
    for dataset in ("cmnist", "mnist-pair"):
        a, b, c = (data.load(DataConfig(dataset=dataset, data_root=str(mnist_root), n_train=300, seed=s), "train")
                   for s in (3, 3, 4))
        for field in ("images", "group", "label"):
            assert torch.equal(getattr(a, field), getattr(b, field))
        assert not torch.equal(a.images, c.images)


def test_dataset_errors_name_the_value(mnist_root, tmp_path):
    root = str(mnist_root)
    for cfg, message in [(DataConfig(dataset="svhn"), "unknown dataset 'svhn'"),
                         (DataConfig(bias=1.5, data_root=root), "--bias 1.5"),
                         (DataConfig(n_train=-1, data_root=root), "--n-train -1"),
                         (DataConfig(colors="red,teal", data_root=root), "unknown color 'teal'"),
                         (DataConfig(n_train=5000, data_root=root), "--n-train 5000"),
                         (DataConfig(data_root=str(tmp_path), download="false"), "MNIST not found")]:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            data.load(cfg, "train")


@needs_mnist
def test_cmnist_and_mnist_pair_on_real_mnist():
    gray, digits = padded_mnist(REAL_ROOT, True)
    check_cmnist(DataConfig(data_root=REAL_ROOT, bias=0.8, n_train=10000), "train", gray, digits, 0.8, tv_bound=0.06)
    gray_test, digits_test = padded_mnist(REAL_ROOT, False)
    test = check_cmnist(DataConfig(data_root=REAL_ROOT, bias=0.8), "test", gray_test, digits_test, 0.5, tv_bound=0.06)
    assert len(test) == 10000 and (test.group == 0).sum() == 5000
    pair = data.load(DataConfig(dataset="mnist-pair", data_root=REAL_ROOT, bias=0.8), "train")
    assert abs((pair.group == 0).float().mean().item() - 0.8) <= 1 / len(pair)
    assert torch.equal(digits[source_of(pair.images[:, 0], gray)], torch.tensor([7, 8])[pair.group])
    pair_test = data.load(DataConfig(dataset="mnist-pair", data_root=REAL_ROOT, bias=0.8), "test")
    assert (pair_test.group == 0).sum() == (pair_test.group == 1).sum() == int((digits_test == 8).sum())


# ---------------------------------------------------------------------------------- CelebA
CELEBA_ATTRS = ("5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose "
                "Black_Hair Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee "
                "Gray_Hair Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard "
                "Oval_Face Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair "
                "Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young").split()
G_STEP = 5   # image i has green = G_STEP·i inside the crop, so a test can tell which image it got


def write_celeba(root: Path, n=48):
    """n 178x218 JPEGs (red outside the 140-px center crop, (0, 5i, 255) inside), official list
    formats with CRLF. Image i: Male if i even, Smiling if (i // 2) odd; i < 32 train, < 40 val, else test."""
    from torchvision.io import encode_jpeg, write_file
    folder = root / "celeba" / "img_align_celeba"
    folder.mkdir(parents=True)
    rows, parts = [], []
    for i in range(n):
        name = f"{i + 1:06d}.jpg"
        img = torch.zeros(3, 218, 178, dtype=torch.uint8)
        img[0] = 255
        img[:, 39:179, 19:159] = torch.tensor([0, G_STEP * i, 255], dtype=torch.uint8)[:, None, None]
        write_file(str(folder / name), encode_jpeg(img, quality=95))
        attrs = [-1] * 40
        attrs[CELEBA_ATTRS.index("Male")] = 1 if i % 2 == 0 else -1
        attrs[CELEBA_ATTRS.index("Smiling")] = 1 if (i // 2) % 2 else -1
        rows.append(name + " " + " ".join(f"{v:2d}" for v in attrs))
        parts.append(f"{name} {0 if i < 32 else 1 if i < 40 else 2}")
    (root / "celeba" / "list_attr_celeba.txt").write_bytes(
        "\r\n".join([str(n), " ".join(CELEBA_ATTRS)] + rows + [""]).encode())
    (root / "celeba" / "list_eval_partition.txt").write_bytes("\r\n".join(parts + [""]).encode())
    return root


def image_ids(s: data.Split) -> torch.Tensor:
    """Which synthetic image each sample is, from the green level in its center."""
    g = s.images[:, 1, 16:48, 16:48].float().mean(dim=(1, 2))
    ids = (g / G_STEP).round().long()
    assert ((g - G_STEP * ids).abs() < 1.5).all()
    return ids


def test_celeba_crop_bias_splits_and_labels(tmp_path):
    root = write_celeba(tmp_path / "data")
    cfg = DataConfig(dataset="celeba", data_root=str(root), bias=0.75, n_train=16)
    train = data.load(cfg, "train")
    assert train.images.dtype == torch.uint8 and train.images.shape == (16, 3, 64, 64)
    border = torch.cat([train.images[:, 0, :2].flatten(), train.images[:, 0, -2:].flatten(),
                        train.images[:, 0, :, :2].flatten(), train.images[:, 0, :, -2:].flatten()])
    assert border.float().mean() < 30                              # cropped: no red frame is left
    assert (train.images[:, 2, 8:56, 8:56] > 230).all()
    assert (train.group == 0).sum() == 12                          # Male share = bias
    ids = image_ids(train)
    assert len(ids.unique()) == 16 and (ids < 32).all()            # train partition only
    assert torch.equal(train.group, ids % 2)                       # group 0 = male = even ids
    assert torch.equal(train.label, (ids // 2) % 2)                # label = Smiling
    for split, lo, hi in (("val", 32, 40), ("test", 40, 48)):
        s = data.load(cfg, split)
        ids = image_ids(s)
        assert len(s) == 8 and ((ids >= lo) & (ids < hi)).all() and (s.group == 0).sum() == 4
    assert torch.equal(data.load(cfg, "train").images, train.images)   # again, from the decoded cache
    assert list(data.CACHE_DIR.glob("celeba_*.pt"))


def test_celeba_missing_images_and_cell_ratio(tmp_path):
    root = write_celeba(tmp_path / "data")
    for i in (0, 3, 40):                                           # two train images and one test image
        (root / "celeba" / "img_align_celeba" / f"{i + 1:06d}.jpg").unlink()
    with pytest.raises(ValueError, match=r"--cond-attr Smiling: the train split has only \d+ images of "
                                         r"\(Smiling, male\), fewer than --min-cell 100"):
        data.load(DataConfig(dataset="celeba", data_root=str(root), n_train=16, cell_ratio="1,3,3,1"), "train")
    cfg = DataConfig(dataset="celeba", data_root=str(root), n_train=16, cell_ratio="1,3,3,1", min_cell=1)
    train = data.load(cfg, "train")
    ids = image_ids(train)
    assert not set(ids.tolist()) & {0, 3, 40}
    cell = (1 - train.label) * 2 + train.group                     # (smile,male) (smile,female) (not,male) (not,female)
    assert torch.bincount(cell, minlength=4).tolist() == [2, 6, 6, 2]
    test = data.load(cfg, "test")                                  # 3 male/smiling-balanced cells of 7 left
    assert 40 not in image_ids(test).tolist()
    assert torch.bincount((1 - test.label) * 2 + test.group, minlength=4).tolist() == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="--cell-ratio '1,2'"):
        data.load(DataConfig(dataset="celeba", data_root=str(root), cell_ratio="1,2"), "train")
    with pytest.raises(ValueError, match="--cond-attr 'Happy'"):
        data.load(DataConfig(dataset="celeba", data_root=str(root), cond_attr="Happy"), "train")


def test_vae_stage_kill_and_resume_is_exact(mnist_root, tmp_path, monkeypatch):
    """Through vae.train_vae: the posterior noise and the initial weights come from the seed."""
    cfg = vae.VAEConfig(data_root=str(mnist_root), n_train=64, channels="8,16", steps=4, batch_size=8,
                        warmup=1, ckpt_every=2, log_every=1)
    torch.manual_seed(1)                                           # global RNG states differ between runs
    vae.train_vae(cfg, tmp_path / "straight", "cpu")
    real_train = vae.train

    def killing_train(model, loss_fn, cfg, out, **kw):
        def dying(net, step, g):
            if step == 2:
                raise KeyboardInterrupt
            return loss_fn(net, step, g)
        return real_train(model, dying, cfg, out, **kw)
    monkeypatch.setattr(vae, "train", killing_train)
    torch.manual_seed(2)
    with pytest.raises(KeyboardInterrupt):
        vae.train_vae(cfg, tmp_path / "resumed", "cpu")
    monkeypatch.setattr(vae, "train", real_train)
    torch.manual_seed(3)
    vae.train_vae(cfg, tmp_path / "resumed", "cpu")
    straight, resumed = load(tmp_path / "straight" / "ckpt.pt"), load(tmp_path / "resumed" / "ckpt.pt")
    assert_same_state(straight, resumed)
    assert torch.equal(straight["scale"], resumed["scale"])


def test_same_seed_same_base_model_and_samples(mnist_root, tmp_path, monkeypatch):
    """ensure_base end to end (tiny autoencoder + UNet), twice from different global RNG states, the
    second time reusing the first's autoencoder: the same seed gives the same weights and the same
    samples, also after load_pipeline."""
    monkeypatch.setitem(vae.PRESETS, "tiny", dict(channels="8,16", steps=4, batch_size=8, lr=1e-3, n_train=64,
                                                  ckpt_every=4, warmup=1))
    pipes = []
    for i, runs in enumerate((tmp_path / "a", tmp_path / "b")):
        if i == 1:                                                 # found by its hash, not retrained
            shutil.copytree(tmp_path / "a" / "cmnist" / pipes[0].cfg.vae, runs / "cmnist" / pipes[0].cfg.vae)
        torch.manual_seed(100 + i)
        cfg = ddpm.base_config(DataConfig(data_root=str(mnist_root), n_train=64), "tiny", steps=4, batch_size=8,
                               channels="8,16", norm_groups=4, sample_steps=2, ckpt_every=4, warmup=1)
        pipes.append(ddpm.ensure_base(cfg, "tiny", str(runs), "cpu"))
    a, b = pipes
    for k, v in a.unet.state_dict().items():
        assert torch.equal(v, b.unet.state_dict()[k]), k
    x = a.sample(6, seed=0)
    assert x.dtype == torch.uint8 and x.shape == (6, 3, 32, 32)
    assert torch.equal(x, b.sample(6, seed=0))
    assert torch.equal(x, ddpm.load_pipeline(a.run_dir).sample(6, seed=0))
    assert (a.run_dir / "samples.png").exists() and (a.run_dir / "samples_uncond.png").exists()


# ================================================================ command lines: bad input
def run_cli(script, args, env):
    """`python script --preset tiny --device cpu args` through tests/cli.py (as a new interpreter runs it)."""
    return cli.run([script, "--preset", "tiny", "--device", "cpu", *args], cwd=REPO, env=env, timeout=120)


def vae_ckpt(runs: Path) -> Path:
    """Where `vae.py/ddpm.py --dataset cmnist --preset tiny` look for the autoencoder."""
    return runs / "cmnist" / f"vae-{config_hash(vae.vae_config(DataConfig(), 'tiny'))}" / "ckpt.pt"


def corrupt_ckpt(runs, tmp):
    vae_ckpt(runs).parent.mkdir(parents=True)
    vae_ckpt(runs).write_bytes(b"not a checkpoint")


def other_config_ckpt(runs, tmp):
    other = vae.vae_config(DataConfig(), "tiny", steps=7)
    save_cache({"config": comparable(other), "step": 7}, vae_ckpt(runs))


def read_only_runs(runs, tmp):
    runs.mkdir()
    runs.chmod(0o500)


BAD_INPUT = [  # id, script, args, env (None = the synthetic data root), setup, what stderr must name
    ("unknown-dataset", "vae.py", ["--dataset", "svhn"], None, None, "unknown dataset 'svhn'"),
    ("missing-data-root", "ddpm.py", ["--dataset", "cmnist", "--download", "false"], "empty", None, "MNIST not found"),
    ("bias-above-1", "ddpm.py", ["--dataset", "cmnist", "--bias", "1.5"], None, None, "--bias 1.5"),
    ("negative-steps", "ddpm.py", ["--dataset", "cmnist", "--steps", "-5"], None, None, "--steps -5"),
    ("unknown-beta-schedule", "ddpm.py", ["--dataset", "cmnist", "--beta-schedule", "quadratic"], None, None,
     "unknown beta schedule 'quadratic'"),
    ("bad-bool", "ddpm.py", ["--dataset", "cmnist", "--compile", "maybe"], None, None,
     "--compile: expected true or false, got 'maybe'"),
    ("bad-float", "vae.py", ["--dataset", "cmnist", "--lr", "fast"], None, None, "--lr: invalid float value: 'fast'"),
    ("negative-kl-weight", "vae.py", ["--dataset", "cmnist", "--kl-weight", "-1"], None, None, "--kl-weight -1.0"),
    ("corrupt-checkpoint", "ddpm.py", ["--dataset", "cmnist"], None, corrupt_ckpt, "is unreadable"),
    ("checkpoint-of-another-config", "vae.py", ["--dataset", "cmnist"], None, other_config_ckpt,
     "written by another config (differs in steps)"),
    ("runs-under-a-file", "ddpm.py", ["--dataset", "cmnist"], None, "file", "not writable"),
    ("runs-read-only", "vae.py", ["--dataset", "cmnist"], None, read_only_runs, "not writable"),
]


def snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else {}


@pytest.mark.parametrize("case", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_cli_bad_input_gives_one_line_and_changes_nothing(case, mnist_root, tmp_path):
    name, script, args, env_kind, setup, expected = case
    if name == "runs-read-only" and os.geteuid() == 0:
        pytest.skip("running as root: chmod does not stop writes (runs-under-a-file covers this)")
    runs = tmp_path / "runs"
    if setup == "file":
        (tmp_path / "a_file").write_text("x")
        runs = tmp_path / "a_file" / "runs"
    elif setup is not None:
        setup(runs, tmp_path)
    (tmp_path / "empty").mkdir()
    env = {**os.environ, "FAIRDIFF_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "FAIRDIFF_DATA": str(tmp_path / "empty" if env_kind == "empty" else mnist_root)}
    before = snapshot(runs)
    try:
        r = run_cli(script, [*args, "--runs", str(runs)], env)
    finally:
        if name == "runs-read-only":
            runs.chmod(0o700)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0, r.stdout
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert expected in lines[0]
    after = snapshot(runs)
    assert all(after.get(p) == content for p, content in before.items())   # nothing overwritten
    assert not [p for p in after if p.name == "ckpt.pt" and p not in before]   # nothing trained


def test_a_data_flag_beats_the_preset_of_the_base_model():
    """--n-train 500 reaches the base model even though the tiny preset trains on 2000 images."""
    assert ddpm.base_config(DataConfig(n_train=500), "tiny").n_train == 500
    assert ddpm.base_config(DataConfig(), "tiny").n_train == 2000
