# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 1 · Latent diffusion, step by step
#
# This notebook runs the project's own code (`data.py`, `vae.py`, `unet.py`, `ddpm.py`) on colored MNIST.
# The pipeline follows latent diffusion (Rombach et al. 2022):
#
# 1. an **autoencoder** compresses each 32×32 image $x$ to a 4×8×8 latent $z_0$;
# 2. a **UNet** $\epsilon_\theta(z_t, t, c)$ learns to predict the noise that was added to $z_0$;
# 3. a **sampler** (DDPM or DDIM) turns Gaussian noise into a latent, and the decoder turns it into an image.
#
# Everything uses the `tiny` preset and runs on a CPU in a few minutes. MNIST is read from
# `$FAIRDIFF_DATA/MNIST/raw` (default `data/`) and fetched there when none of its files is present. Run
# folders go to `$FAIRDIFF_RUNS` (default `runs/`); a stage already there with the same config hash is
# reused, so notebook 2 reuses the models trained here (notebook 3 reuses the autoencoder and trains its own
# base model on differently colored digits). On a GPU the same code runs at full size:
# `python ddpm.py --dataset cmnist` (preset `small`).

# %%
import json
import re
import sys
import time
from pathlib import Path

# The repository root holds the project's modules (flat files) and notebooks/setup_notebook.py, the setup
# the three notebooks share; Jupyter may have started in the root or in notebooks/. In a hosted notebook,
# clone the repository and open the notebook from the clone (or `%cd` into it) first.
ROOT = next((p for p in (Path.cwd(), Path.cwd().parent) if (p / "ddpm.py").exists()), None)
if ROOT is None:
    raise FileNotFoundError(f"no ddpm.py in {Path.cwd()} or its parent: clone the repository and open the notebook from it")
sys.path.insert(0, str(ROOT / "notebooks"))
from setup_notebook import DEVICE, PRESET, RUNS, setup, show
setup(ROOT)   # before importing torch: a fresh Python (a hosted notebook) gets requirements.txt installed here

import torch
import data
import ddpm
import unet
import vae
# %matplotlib inline
import matplotlib.pyplot as plt   # after the imports: ddpm.py selects the file-only Agg backend for its CLI

# %% [markdown]
# ## 1 · The data: colored MNIST with a bias
#
# Each digit is painted in its group's color, pixel $= \frac{\text{intensity}}{255}\cdot\text{color}$
# (group 0 red, group 1 green). The training split keeps a share `bias` of group 0:
#
# $$n_0 = \operatorname{round}(\text{bias}\cdot N), \qquad n_1 = N - n_0 .$$
#
# The held-out test split is balanced 50/50, so an evaluation never inherits the bias. The tiny preset
# trains on $N = 2000$ images with bias $0.8$. Colors go to a random permutation of the images, so the
# digits keep their natural distribution inside each group: the bias is in the color only.

# %%
data_cfg = data.DataConfig(dataset="cmnist")            # bias 0.8, colors red,green
cfg = ddpm.base_config(data_cfg, PRESET, log_every=10)  # the tiny base model (log_every: a denser loss curve; not hashed)
train = data.load(ddpm.data_config(cfg), "train")       # exactly what the base model trains on
test = data.load(data_cfg, "test")
print(f"images {tuple(train.images.shape)} {train.images.dtype}, group {tuple(train.group.shape)}, "
      f"label {tuple(train.label.shape)}; groups {train.group_names}, {train.num_classes} classes")
for name, split in (("train", train), ("test", test)):
    counts = torch.bincount(split.group, minlength=2).tolist()
    print(f"{name:5s} {len(split):6d} images: " + ", ".join(
        f"{g} {c} ({c / len(split):.1%})" for g, c in zip(split.group_names, counts)))

fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 2.6), width_ratios=[2, 1])
show(train.images[:48], nrow=16, title="training images", ax=ax0)
for g, name in enumerate(train.group_names):           # digit histogram per group: the same shape
    digits = torch.bincount(train.label[train.group == g], minlength=10).float()
    ax1.bar(torch.arange(10) + 0.4 * g - 0.2, digits / digits.sum(), width=0.4, color=name, label=name)
ax1.set(xlabel="digit", ylabel="share within the group", xticks=range(10), title="digits per group")
ax1.legend();

# %% [markdown]
# ## 2 · The autoencoder (first stage)
#
# The encoder gives a diagonal Gaussian posterior $q(z\mid x) = \mathcal N(\mu, \sigma^2)$ over a
# $4\times 8\times 8$ latent (downsampling $f = 4$), the decoder maps $z$ back to an image, and training minimises
#
# $$\mathcal L_{\text{VAE}} = \operatorname{mean}|x-\hat x| + \operatorname{mean}(x-\hat x)^2
#  + \lambda_{KL}\,\frac{\sum \mathrm{KL}\big(q(z\mid x)\,\|\,\mathcal N(0, I)\big)}{3HW}.$$
#
# The diffusion model wants latents of unit variance, so after training the code measures
# $\text{scale} = 1/\operatorname{std}(\mu)$ over the training images and stores it in the checkpoint:
# $z_0 = \text{scale}\cdot\mu(x)$. The autoencoder is bias-neutral (trained on the balanced version of the
# data), so every bias setting shares it.

# %%
autoencoder, vae_dir = vae.ensure_vae(data_cfg, PRESET, RUNS, DEVICE)   # trains 300 steps on the first run
x = test.images[:16]                                                    # uint8 [16, 3, 32, 32]
with torch.no_grad():
    posterior = autoencoder.encode(vae.to_unit(x))                      # μ, σ: [16, 4, 8, 8] each
    x_hat = autoencoder.decode_latents(posterior.mode() * autoencoder.scale)   # uint8 [16, 3, 32, 32]
error = (x.float() - x_hat.float()).abs().mean() / 255
print(f"{vae_dir}: latent {tuple(posterior.mean.shape[1:])}, mean σ {posterior.std.mean():.4f}, "
      f"scale factor {float(autoencoder.scale):.4f}; test mean |x − x̂| = {error:.4f} (of 1)")
show(torch.cat([x, x_hat]), nrow=16, title="top: held-out test images · bottom: reconstructions")

# %% [markdown]
# A look at the latents the diffusion model will learn: `vae.encode_dataset` caches
# $z_0 = \text{scale}\cdot\mu(x)$ for the whole training split. Each image becomes four 8×8 channels. The
# scale made the standard deviation exactly 1 on the autoencoder's own (balanced) training images, so on this
# biased split it comes out close to 1; the values are not Gaussian, and the diffusion model does not need
# them to be.

# %%
latents = vae.encode_dataset(autoencoder, vae_dir, ddpm.data_config(cfg), DEVICE)
z0 = latents["z0"]                                                      # [2000, 4, 8, 8]
print(f"z0 {tuple(z0.shape)}: mean {z0.mean():.3f}, std {z0.std():.3f}")
fig, axes = plt.subplots(3, 5, figsize=(7, 4.4))
for row, i in enumerate([0, 1, 2]):
    axes[row, 0].imshow(train.images[i].permute(1, 2, 0).numpy())
    for ch in range(4):
        axes[row, ch + 1].imshow(z0[i, ch].numpy(), cmap="RdBu_r", vmin=-3, vmax=3)
        axes[0, ch + 1].set_title(f"channel {ch}")
for ax in axes.flat:
    ax.axis("off")
fig.suptitle("an image and its four latent channels (8×8)")
plt.figure(figsize=(5, 2.6))
plt.hist(z0.flatten().numpy(), bins=80, density=True, alpha=0.7, label="z0 (scaled)")
grid = torch.linspace(-4, 4, 200)
plt.plot(grid, torch.exp(-grid ** 2 / 2) / (2 * torch.pi) ** 0.5, label="N(0, 1)")
plt.legend(); plt.xlabel("latent value");

# %% [markdown]
# ## 3 · The forward process
#
# Noise is added in closed form (Ho et al. 2020). With $\bar\alpha_t = \prod_{s\le t}(1-\beta_s)$
# (`alphas_cumprod`) and $t\in[0, T-1]$,
#
# $$q(z_t\mid z_0) = \mathcal N\!\big(\sqrt{\bar\alpha_t}\,z_0,\;(1-\bar\alpha_t)\,I\big)
# \quad\Longrightarrow\quad z_t = \sqrt{\bar\alpha_t}\,z_0 + \sqrt{1-\bar\alpha_t}\,\epsilon,\;\epsilon\sim\mathcal N(0, I),$$
#
# which is `scheduler.add_noise(z0, noise, t)`. The project uses LDM's `scaled_linear` schedule
# ($\sqrt{\beta_t}$ linear from $\sqrt{0.00085}$ to $\sqrt{0.012}$, $T = 1000$); below it is plotted next to
# Ho et al.'s linear schedule and the cosine schedule, then one latent is noised across $t$ (the same
# $\epsilon$ at every $t$) and each $z_t$ decoded.

# %%
scheduler = ddpm.build_scheduler(cfg, "ddpm")          # T = 1000, scaled_linear
schedules = {"scaled_linear (ours, LDM)": scheduler,
             "linear (Ho et al.)": ddpm.DDPMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
             "cosine (Nichol & Dhariwal)": ddpm.DDPMScheduler(beta_schedule="cosine")}
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3))
for name, s in schedules.items():
    ax0.plot(s.alphas_cumprod.numpy(), label=name)
ax0.set(xlabel="t", ylabel=r"$\bar\alpha_t$", title="alphas_cumprod"); ax0.legend(fontsize=8)
ax1.plot(scheduler.alphas_cumprod.sqrt().numpy(), label=r"signal $\sqrt{\bar\alpha_t}$")
ax1.plot((1 - scheduler.alphas_cumprod).sqrt().numpy(), label=r"noise $\sqrt{1-\bar\alpha_t}$")
ax1.set(xlabel="t", title="our schedule's coefficients"); ax1.legend(fontsize=8)
print(f"ᾱ_0 = {scheduler.alphas_cumprod[0]:.4f}, ᾱ_999 = {scheduler.alphas_cumprod[-1]:.4f} "
      "(some signal is left at t = T−1: sampling starts from pure noise anyway)")

ts = torch.tensor([0, 50, 100, 200, 400, 600, 999])
z = z0[:1].expand(len(ts), -1, -1, -1)                  # one latent, repeated: [7, 4, 8, 8]
noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(0))
z_t = scheduler.add_noise(z, noise, ts)                  # √ᾱ_t z0 + √(1−ᾱ_t) ε
with torch.no_grad():
    decoded = autoencoder.decode_latents(z_t)            # uint8 [7, 3, 32, 32]
print(f"t = 0: std(z_t − z0) = {(z_t[0] - z0[0]).std():.3f} ≈ √(1 − ᾱ_0) = {(1 - scheduler.alphas_cumprod[0]) ** 0.5:.3f}")
fig, axes = plt.subplots(2, len(ts), figsize=(1.4 * len(ts), 3.2))
for k, t in enumerate(ts.tolist()):
    axes[0, k].imshow(decoded[k].permute(1, 2, 0).numpy())
    axes[0, k].set_title(f"t={t}\nᾱ={scheduler.alphas_cumprod[t]:.3f}", fontsize=9)
    axes[1, k].imshow(z_t[k, 0].numpy(), cmap="RdBu_r", vmin=-3, vmax=3)
for ax in axes.flat:
    ax.axis("off")
fig.suptitle("top: decoder(z_t) · bottom: channel 0 of z_t", y=1.06);

# %% [markdown]
# ## 4 · The denoiser: a UNet over latents
#
# $\epsilon_\theta(z_t, t, c)$ takes the noisy latent, the timestep (sinusoidal embedding + MLP) and a class
# $c\in\{0,\dots,K-1\}$ or the null class $\varnothing = K$; it returns a tensor the shape of $z_t$. Down
# blocks halve the resolution, attention runs at the lowest one, up blocks concatenate the skips.
# The output conv is zero-initialised, so an untrained model predicts $\hat\epsilon = 0$. Forward hooks
# print the shape after every block:

# %%
import re

denoiser = ddpm.build_unet(cfg, train.num_classes)      # an untrained copy, to look inside
print(f"UNet channels {cfg.channels}, {cfg.num_res_blocks} ResBlock per level: "
      f"{unet.count_parameters(denoiser):,} parameters")
shapes = []
blocks = re.compile(r"conv_in|down\.\d+\.\d+|mid\.\d+|up\.\d+\.\d+|out")
hooks = [m.register_forward_hook(lambda m, args, out, name=name: shapes.append((name, type(m).__name__, tuple(out.shape))))
         for name, m in denoiser.named_modules() if blocks.fullmatch(name)]
z_in = torch.randn(2, *z0.shape[1:])                    # [2, 4, 8, 8]
t_in = torch.tensor([10, 900])
c_in = torch.tensor([3, train.num_classes])             # a "3" and the null class ∅
with torch.no_grad():
    eps_hat = denoiser(z_in, t_in, c_in)
for h in hooks:
    h.remove()
for name, kind, shape in shapes:
    print(f"  {name:8s} {kind:10s} -> {shape}")
assert eps_hat.shape == z_in.shape and eps_hat.abs().max() == 0   # zero-initialised output: ε̂ = 0
print(f"output {tuple(eps_hat.shape)} = input shape; all zeros before training")

# %% [markdown]
# ## 5 · Training
#
# The loss of LDM (Ho et al.'s "simple" loss on latents), with the class dropped to $\varnothing$ with
# probability $p_{\text{uncond}} = 0.1$ so one model is both conditional and unconditional:
#
# $$\mathcal L = \mathbb E_{t\sim U\{0..T-1\},\;\epsilon\sim\mathcal N(0,I),\;c}\,\big\|\epsilon - \epsilon_\theta(z_t, t, c)\big\|^2 .$$
#
# Before training $\hat\epsilon = 0$, so the loss is $\mathbb E\|\epsilon\|^2 = 1$ (per element). `ensure_base`
# then trains the tiny model (300 AdamW steps with EMA, `train.py`'s loop) or reuses it.

# %%
gen = torch.Generator().manual_seed(0)
z_batch, c_batch = z0[:256], ddpm.drop_labels(latents["label"][:256], train.num_classes, cfg.p_uncond, gen)
with torch.no_grad():
    loss_untrained = ddpm.diffusion_loss(denoiser, scheduler, z_batch, c_batch, torch.Generator().manual_seed(1))
print(f"untrained: loss {loss_untrained:.4f} (= E‖ε‖², since ε̂ = 0)")
assert abs(loss_untrained - 1) < 0.05

start = time.perf_counter()
pipe = ddpm.ensure_base(cfg, PRESET, RUNS, DEVICE)     # trains (about half a minute on a CPU) or reuses
with torch.no_grad():
    loss_trained = ddpm.diffusion_loss(pipe.unet, scheduler, z_batch, c_batch, torch.Generator().manual_seed(1))
print(f"{time.perf_counter() - start:.0f} s; {pipe.run_dir}; the same batch now has loss {loss_trained:.4f}")

log = [json.loads(line) for line in (pipe.run_dir / "log.jsonl").read_text().splitlines()]
plt.figure(figsize=(5, 2.8))
plt.plot([r["step"] for r in log], [r["loss"] for r in log], marker=".")
plt.yscale("log"); plt.xlabel("step"); plt.ylabel("training loss (mean over the steps logged)")
plt.title("tiny base model");

# %% [markdown]
# ## 6 · Sampling: DDPM vs DDIM
#
# Both start from $z_T\sim\mathcal N(0, I)$ and walk down a list of timesteps $t > t'$, using
# $\hat z_0 = (z_t - \sqrt{1-\bar\alpha_t}\,\hat\epsilon)/\sqrt{\bar\alpha_t}$.
#
# **DDPM** (Ho et al., eq. 7) samples the posterior $q(z_{t'}\mid z_t, \hat z_0)$ with
# $\beta' = 1 - \bar\alpha_t/\bar\alpha_{t'}$:
#
# $$z_{t'} = \frac{\sqrt{\bar\alpha_{t'}}\,\beta'}{1-\bar\alpha_t}\hat z_0 + \frac{\sqrt{1-\beta'}\,(1-\bar\alpha_{t'})}{1-\bar\alpha_t} z_t
#  + \sigma\,\xi,\qquad \sigma^2 = \frac{1-\bar\alpha_{t'}}{1-\bar\alpha_t}\beta' .$$
#
# **DDIM** (Song et al., eq. 12) with $\eta = 0$ is deterministic, and works with few steps:
#
# $$z_{t'} = \sqrt{\bar\alpha_{t'}}\,\hat z_0 + \sqrt{1-\bar\alpha_{t'}}\,\hat\epsilon .$$
#
# The same seed gives the same $z_T$ to every sampler below, so DDIM with 10 and 50 steps can be compared image
# by image (DDPM adds fresh noise at every step).

# %%
runs_by_sampler, seconds = {}, {}                       # seconds: (sampler, steps) -> time for 64 images
for sampler, steps in (("ddpm", 1000), ("ddim", 50), ("ddim", 10)):
    start = time.perf_counter()
    images = pipe.sample(64, seed=0, sampler=sampler, steps=steps)      # unconditional (c = ∅)
    seconds[sampler, steps] = time.perf_counter() - start
    runs_by_sampler[f"{sampler.upper()}, {steps} steps"] = images
    print(f"{sampler.upper()} {steps:4d} steps: 64 images in {seconds[sampler, steps]:.2f} s")
fig, axes = plt.subplots(1, 3, figsize=(10, 1.9))
for ax, (name, images) in zip(axes, runs_by_sampler.items()):
    show(images[:32], nrow=8, title=name, ax=ax)
ddpm_1000, ddim_50, ddim_10 = (x.float() / 255 for x in runs_by_sampler.values())
print(f"mean |difference| per pixel: DDIM-10 vs DDIM-50 {(ddim_10 - ddim_50).abs().mean():.3f}, "
      f"DDPM-1000 vs DDIM-50 {(ddpm_1000 - ddim_50).abs().mean():.3f}")

# %% [markdown]
# Sampling time grows linearly with the number of network evaluations, which is why DDIM's 10–50 steps are
# the default (`sample_steps`) for grids and evaluation (the three runs above are timed already; the others
# are timed here):

# %%
timing = {"ddim": [5, 10, 20, 50, 100], "ddpm": [50, 200, 1000]}
plt.figure(figsize=(5, 3))
for sampler, steps_list in timing.items():
    for steps in steps_list:
        if (sampler, steps) not in seconds:
            start = time.perf_counter()
            pipe.sample(64, seed=0, sampler=sampler, steps=steps)
            seconds[sampler, steps] = time.perf_counter() - start
    times = [seconds[sampler, steps] for steps in steps_list]
    plt.plot(steps_list, times, marker="o", label=sampler.upper())
    print(sampler.upper(), ", ".join(f"{n} steps {t:.2f} s" for n, t in zip(steps_list, times)))
plt.xscale("log"); plt.yscale("log"); plt.xlabel("sampling steps"); plt.ylabel("seconds for 64 images (CPU)")
plt.legend();

# %% [markdown]
# **Class-conditional samples with classifier-free guidance.** Conditioning on a digit $c$ and mixing the
# conditional and the null prediction with scale $s$ (both in one batch):
#
# $$\hat\epsilon_{\text{cfg}} = \hat\epsilon(z_t, t, \varnothing) + s\,\big(\hat\epsilon(z_t, t, c) - \hat\epsilon(z_t, t, \varnothing)\big).$$
#
# One column per digit. The colors follow the training data's bias; notebook 2 measures that.

# %%
cond = torch.arange(train.num_classes).repeat(6)       # [60]: columns 0…9, six rows
images = pipe.sample(len(cond), cond, seed=0, guidance_scale=cfg.guidance_scale)
show(images, nrow=10, title=f"DDIM-{cfg.sample_steps}, CFG s = {cfg.guidance_scale}: one column per digit")

# %% [markdown]
# ## Next
#
# * `02_ddm.ipynb` measures the bias this model inherits and fine-tunes it with DDM's indicator loss.
# * `03_invdiff.ipynb` keeps it frozen and trains InvDiff's guidance module, without group labels.
#
# The tiny model is far from converged; for real samples train on a GPU: `python ddpm.py --dataset cmnist`.
