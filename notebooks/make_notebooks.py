"""Writes the three teaching notebooks from the cells below, and optionally executes them.

    python notebooks/make_notebooks.py                       # write the .ipynb files (no outputs)
    python notebooks/make_notebooks.py --execute --runs DIR  # write, run 01 → 02 → 03 top to bottom on
                                                             # CPU sharing run folder DIR, save with outputs

Edit a notebook here, not in Jupyter, so the three stay in step with the code they teach;
tests/test_notebooks.py checks that the committed .ipynb files hold exactly these cells, executed.
Every computation calls the project's modules: the notebooks import, plot and explain, never
re-implement.
"""
import argparse
import os
import time
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
KERNEL = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}


def md(text):
    return new_markdown_cell(text.strip())


def code(text):
    return new_code_cell(text.strip())


def setup(imports):
    """The first code cell of every notebook: repository root, threads, run folder, imports, `show`."""
    return code(f'''
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

# Work from the repository root (the project's modules are flat files there), whether Jupyter
# started in the root or in notebooks/.
ROOT = next((p for p in (Path.cwd(), Path.cwd().parent) if (p / "ddpm.py").exists()), None)
if ROOT is None:
    raise FileNotFoundError(f"no ddpm.py in {{Path.cwd()}} or its parent: open the notebook inside the repository")
os.chdir(ROOT)
sys.path.insert(0, str(ROOT))

import torch
torch.set_num_threads(1)   # the tiny models gain nothing from more threads; on a busy CPU extra threads spin-wait
RUNS = os.environ.get("FAIRDIFF_RUNS", "runs")   # run folders; a stage already there (same config hash) is reused
PRESET, DEVICE = "tiny", "cpu"

{imports}
%matplotlib inline
import matplotlib.pyplot as plt   # after the imports: ddpm.py selects the file-only Agg backend for its CLI
from IPython.display import Image, Markdown, display
from torchvision.utils import make_grid


def show(images, nrow=16, title="", ax=None):
    """Draw uint8 images [N, 3, H, W] as one grid."""
    grid = make_grid(images.cpu().float() / 255, nrow=nrow, padding=1, pad_value=1)   # [3, H', W']
    if ax is None:
        rows = -(-len(images) // nrow)
        ax = plt.figure(figsize=(0.36 * nrow, 0.36 * rows + 0.4)).gca()   # about one screen pixel per image pixel
    ax.imshow(grid.permute(1, 2, 0).numpy())
    ax.set_title(title)
    ax.axis("off")


print(f"preset {{PRESET}} on {{DEVICE}}; data root {{data.data_root(data.DataConfig()).resolve()}}; "
      f"run folders in {{Path(RUNS).resolve()}}")
''')


def committed_results(method):
    """The cell that shows the GPU results committed under results/ (read from their metrics.json)."""
    return code(f'''
# Every metrics.json under results/ written by {method}.py, shown from the file itself (nothing re-typed).
committed = [(p, json.loads(p.read_text())) for p in sorted(Path("results").glob("**/metrics.json"))]
committed = [(p, m) for p, m in committed if m.get("method") == "{method}"]
if not committed:
    print("no committed GPU results yet (no results/**/metrics.json with method '{method}')")
for path, m in committed:
    ref = m["reference"]
    shares = ", ".join(f"{{n}} {{v:.3f}}" for n, v in zip(ref["group_names"], ref["train_p_hat"]))
    display(Markdown(f"### {{m['dataset']}} · preset `{{m['preset']}}` · {{m['device']}} — `{{path}}`\\n\\n"
                     + evaluate.format_table(m)
                     + f"\\n\\nTraining share: {{shares}} (FD_half_l1 {{ref['train_FD_half_l1']:.3f}}); "
                     f"FID-C floor (real vs real) {{ref['FID_C_floor']:.2f}}; classifiers: {{m['classifiers']}}"))
    if (path.parent / "tradeoff.png").exists():
        display(Image(filename=str(path.parent / "tradeoff.png"), width=420))
''')


# ============================================================================ 01 latent diffusion
NB1 = [
    md(r"""
# 1 · Latent diffusion, step by step

This notebook runs the project's own code (`data.py`, `vae.py`, `unet.py`, `ddpm.py`) on colored MNIST.
The pipeline follows latent diffusion (Rombach et al. 2022):

1. an **autoencoder** compresses each 32×32 image $x$ to a 4×8×8 latent $z_0$;
2. a **UNet** $\epsilon_\theta(z_t, t, c)$ learns to predict the noise that was added to $z_0$;
3. a **sampler** (DDPM or DDIM) turns Gaussian noise into a latent, and the decoder turns it into an image.

Everything uses the `tiny` preset and runs on a CPU in a few minutes. Set `FAIRDIFF_DATA` to the folder
holding `MNIST/raw`. Run folders go to `$FAIRDIFF_RUNS` (default `runs/`); a stage already there with the
same config hash is reused, so notebooks 2 and 3 reuse the models trained here. On a GPU the same code runs
at full size: `python ddpm.py --dataset cmnist` (preset `small`).
"""),
    setup("import data\nimport ddpm\nimport unet\nimport vae"),
    md(r"""
## 1 · The data: colored MNIST with a bias

Each digit is painted in its group's color, pixel $= \frac{\text{intensity}}{255}\cdot\text{color}$
(group 0 red, group 1 green). The training split keeps a share `bias` of group 0:

$$n_0 = \operatorname{round}(\text{bias}\cdot N), \qquad n_1 = N - n_0 .$$

The held-out test split is balanced 50/50, so an evaluation never inherits the bias. The tiny preset
trains on $N = 2000$ images with bias $0.8$. Colors go to a random permutation of the images, so the
digits keep their natural distribution inside each group: the bias is in the color only.
"""),
    code(r'''
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
'''),
    md(r"""
## 2 · The autoencoder (first stage)

The encoder gives a diagonal Gaussian posterior $q(z\mid x) = \mathcal N(\mu, \sigma^2)$ over a
$4\times 8\times 8$ latent (downsampling $f = 4$), the decoder maps $z$ back to an image, and training minimises

$$\mathcal L_{\text{VAE}} = \operatorname{mean}|x-\hat x| + \operatorname{mean}(x-\hat x)^2
 + \lambda_{KL}\,\frac{\sum \mathrm{KL}\big(q(z\mid x)\,\|\,\mathcal N(0, I)\big)}{3HW}.$$

The diffusion model wants latents of unit variance, so after training the code measures
$\text{scale} = 1/\operatorname{std}(\mu)$ over the training images and stores it in the checkpoint:
$z_0 = \text{scale}\cdot\mu(x)$. The autoencoder is bias-neutral (trained on the balanced version of the
data), so every bias setting shares it.
"""),
    code(r'''
autoencoder, vae_dir = vae.ensure_vae(data_cfg, PRESET, RUNS, DEVICE)   # trains 300 steps on the first run
x = test.images[:16]                                                    # uint8 [16, 3, 32, 32]
with torch.no_grad():
    posterior = autoencoder.encode(vae.to_unit(x))                      # μ, σ: [16, 4, 8, 8] each
    x_hat = autoencoder.decode_latents(posterior.mode() * autoencoder.scale)   # uint8 [16, 3, 32, 32]
error = (x.float() - x_hat.float()).abs().mean() / 255
print(f"{vae_dir}: latent {tuple(posterior.mean.shape[1:])}, mean σ {posterior.std.mean():.4f}, "
      f"scale factor {float(autoencoder.scale):.4f}; test mean |x − x̂| = {error:.4f} (of 1)")
show(torch.cat([x, x_hat]), nrow=16, title="top: held-out test images · bottom: reconstructions")
'''),
    md(r"""
A look at the latents the diffusion model will learn: `vae.encode_dataset` caches
$z_0 = \text{scale}\cdot\mu(x)$ for the whole training split. Each image becomes four 8×8 channels. The
scale made the standard deviation exactly 1 on the autoencoder's own (balanced) training images, so on this
biased split it comes out close to 1; the values are not Gaussian, and the diffusion model does not need
them to be.
"""),
    code(r'''
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
'''),
    md(r"""
## 3 · The forward process

Noise is added in closed form (Ho et al. 2020). With $\bar\alpha_t = \prod_{s\le t}(1-\beta_s)$
(`alphas_cumprod`) and $t\in[0, T-1]$,

$$q(z_t\mid z_0) = \mathcal N\!\big(\sqrt{\bar\alpha_t}\,z_0,\;(1-\bar\alpha_t)\,I\big)
\quad\Longrightarrow\quad z_t = \sqrt{\bar\alpha_t}\,z_0 + \sqrt{1-\bar\alpha_t}\,\epsilon,\;\epsilon\sim\mathcal N(0, I),$$

which is `scheduler.add_noise(z0, noise, t)`. The project uses LDM's `scaled_linear` schedule
($\sqrt{\beta_t}$ linear from $\sqrt{0.00085}$ to $\sqrt{0.012}$, $T = 1000$); below it is plotted next to
Ho et al.'s linear schedule and the cosine schedule, then one latent is noised across $t$ (the same
$\epsilon$ at every $t$) and each $z_t$ decoded.
"""),
    code(r'''
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
'''),
    md(r"""
## 4 · The denoiser: a UNet over latents

$\epsilon_\theta(z_t, t, c)$ takes the noisy latent, the timestep (sinusoidal embedding + MLP) and a class
$c\in\{0,\dots,K-1\}$ or the null class $\varnothing = K$; it returns a tensor the shape of $z_t$. Down
blocks halve the resolution, attention runs at the lowest one, up blocks concatenate the skips.
The output conv is zero-initialised, so an untrained model predicts $\hat\epsilon = 0$. Forward hooks
print the shape after every block:
"""),
    code(r'''
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
'''),
    md(r"""
## 5 · Training

The loss of LDM (Ho et al.'s "simple" loss on latents), with the class dropped to $\varnothing$ with
probability $p_{\text{uncond}} = 0.1$ so one model is both conditional and unconditional:

$$\mathcal L = \mathbb E_{t\sim U\{0..T-1\},\;\epsilon\sim\mathcal N(0,I),\;c}\,\big\|\epsilon - \epsilon_\theta(z_t, t, c)\big\|^2 .$$

Before training $\hat\epsilon = 0$, so the loss is $\mathbb E\|\epsilon\|^2 = 1$ (per element). `ensure_base`
then trains the tiny model (300 AdamW steps with EMA, `train.py`'s loop) or reuses it.
"""),
    code(r'''
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
'''),
    md(r"""
## 6 · Sampling: DDPM vs DDIM

Both start from $z_T\sim\mathcal N(0, I)$ and walk down a list of timesteps $t > t'$, using
$\hat z_0 = (z_t - \sqrt{1-\bar\alpha_t}\,\hat\epsilon)/\sqrt{\bar\alpha_t}$.

**DDPM** (Ho et al., eq. 7) samples the posterior $q(z_{t'}\mid z_t, \hat z_0)$ with
$\beta' = 1 - \bar\alpha_t/\bar\alpha_{t'}$:

$$z_{t'} = \frac{\sqrt{\bar\alpha_{t'}}\,\beta'}{1-\bar\alpha_t}\hat z_0 + \frac{\sqrt{1-\beta'}\,(1-\bar\alpha_{t'})}{1-\bar\alpha_t} z_t
 + \sigma\,\xi,\qquad \sigma^2 = \frac{1-\bar\alpha_{t'}}{1-\bar\alpha_t}\beta' .$$

**DDIM** (Song et al., eq. 12) with $\eta = 0$ is deterministic, and works with few steps:

$$z_{t'} = \sqrt{\bar\alpha_{t'}}\,\hat z_0 + \sqrt{1-\bar\alpha_{t'}}\,\hat\epsilon .$$

The same seed gives the same $z_T$ to every sampler below, so DDIM with 10 and 50 steps can be compared image
by image (DDPM adds fresh noise at every step).
"""),
    code(r'''
runs_by_sampler = {}
for sampler, steps in (("ddpm", 1000), ("ddim", 50), ("ddim", 10)):
    start = time.perf_counter()
    images = pipe.sample(64, seed=0, sampler=sampler, steps=steps)      # unconditional (c = ∅)
    runs_by_sampler[f"{sampler.upper()}, {steps} steps"] = images
    print(f"{sampler.upper()} {steps:4d} steps: 64 images in {time.perf_counter() - start:.2f} s")
fig, axes = plt.subplots(1, 3, figsize=(10, 1.9))
for ax, (name, images) in zip(axes, runs_by_sampler.items()):
    show(images[:32], nrow=8, title=name, ax=ax)
ddpm_1000, ddim_50, ddim_10 = (x.float() / 255 for x in runs_by_sampler.values())
print(f"mean |difference| per pixel: DDIM-10 vs DDIM-50 {(ddim_10 - ddim_50).abs().mean():.3f}, "
      f"DDPM-1000 vs DDIM-50 {(ddpm_1000 - ddim_50).abs().mean():.3f}")
'''),
    md(r"""
Sampling time grows linearly with the number of network evaluations, which is why DDIM's 10–50 steps are
the default (`sample_steps`) for grids and evaluation:
"""),
    code(r'''
timing = {"ddim": [5, 10, 20, 50, 100], "ddpm": [50, 200, 1000]}
plt.figure(figsize=(5, 3))
for sampler, steps_list in timing.items():
    seconds = []
    for steps in steps_list:
        start = time.perf_counter()
        pipe.sample(64, seed=0, sampler=sampler, steps=steps)
        seconds.append(time.perf_counter() - start)
    plt.plot(steps_list, seconds, marker="o", label=sampler.upper())
    print(sampler.upper(), ", ".join(f"{n} steps {s:.2f} s" for n, s in zip(steps_list, seconds)))
plt.xscale("log"); plt.yscale("log"); plt.xlabel("sampling steps"); plt.ylabel("seconds for 64 images (CPU)")
plt.legend();
'''),
    md(r"""
**Class-conditional samples with classifier-free guidance.** Conditioning on a digit $c$ and mixing the
conditional and the null prediction with scale $s$ (both in one batch):

$$\hat\epsilon_{\text{cfg}} = \hat\epsilon(z_t, t, \varnothing) + s\,\big(\hat\epsilon(z_t, t, c) - \hat\epsilon(z_t, t, \varnothing)\big).$$

One column per digit. The colors follow the training data's bias; notebook 2 measures that.
"""),
    code(r'''
cond = torch.arange(train.num_classes).repeat(6)       # [60]: columns 0…9, six rows
images = pipe.sample(len(cond), cond, seed=0, guidance_scale=cfg.guidance_scale)
show(images, nrow=10, title=f"DDIM-{cfg.sample_steps}, CFG s = {cfg.guidance_scale}: one column per digit")
'''),
    md(r"""
## Next

* `02_ddm.ipynb` measures the bias this model inherits and fine-tunes it with DDM's indicator loss.
* `03_invdiff.ipynb` keeps it frozen and trains InvDiff's guidance module, without group labels.

The tiny model is far from converged; for real samples train on a GPU: `python ddpm.py --dataset cmnist`.
"""),
]

# ======================================================================================== 02 DDM
NB2 = [
    md(r"""
# 2 · DDM: an indicator on the predicted noise

A diffusion model trained on biased data reproduces the bias. DDM (the Debiasing Diffusion Model,
arXiv 2503.12536) fine-tunes it with one extra term: an indicator $C$ reads the model's predicted noise
$\hat\epsilon$ and is trained, together with the model, to recognise the sensitive group $y$. The group is
used in training only; sampling is the plain sampler and never takes $y$.

`python ddm.py --dataset cmnist` runs the authors' regime (protocol `prior`: a balanced prior, a short LoRA
fine-tune on a small biased subset, five seeds, a verdict written by the code). This notebook steps through
the same code on notebook 1's biased model (protocol `biased-base`, tiny preset, two seeds) so that it runs
on a CPU in minutes: the inherited bias, the objective on one batch, a stacked sweep over $\alpha$ and
seeds, intervals across seeds, the verdict rule, the trade-off and the samples; at the end it shows the
full-scale GPU reports committed in `results/`.
"""),
    setup("import data\nimport ddm\nimport ddpm\nimport evaluate\nimport metrics\nimport torch.nn.functional as F\nimport vae\nfrom stack import Stacked"),
    md(r"""
## 1 · The base model inherits the data's bias

The evaluation reads each generated image's group $y\in\{0, 1\}$ from its pixels (the nearest palette color
of the foreground) and its digit from a small CNN trained on real MNIST. With $\hat p_k$ the share of
samples in group $k$, fairness is the distance to the uniform share:

$$\hat p_k = \frac{n_k}{\sum_j n_j},\qquad \mathrm{FD} = \tfrac12\sum_k\big|\hat p_k - \tfrac1K\big| = |\hat p_0 - 0.5|\;(K = 2).$$

The base model of notebook 1 (reused here, or trained if missing) saw 80% red digits:
"""),
    code(r'''
data_cfg = data.DataConfig(dataset="cmnist")
pipe = ddpm.ensure_base(ddpm.base_config(data_cfg, PRESET), PRESET, RUNS, DEVICE)   # notebook 1's model
evaluator = evaluate.get_evaluator(data_cfg, RUNS, DEVICE, epochs=1)   # 1 epoch for the tiny preset (default 3)
print("held-out accuracy of the evaluation readers:", {k: round(v, 4) for k, v in evaluator.accuracies.items()})

train = data.load(pipe.data_cfg, "train")
p_train = metrics.group_shares(train.group, 2)
samples = pipe.sample(500, seed=0)                      # unconditional: c = ∅, as in the FD scenario
groups = evaluator.groups(samples)                      # [500]: 0 red, 1 green, -1 no foreground
p_hat, ci = metrics.group_shares(groups, 2), metrics.bootstrap(groups, 2)
print(f"training data: p(red) = {p_train[0]:.3f}, FD = {metrics.fd_half_l1(p_train):.3f}")
print(f"base samples:  p̂(red) = {p_hat[0]:.3f} [95% CI {ci['p_hat'][0, 0]:.3f}, {ci['p_hat'][0, 1]:.3f}], "
      f"FD = {metrics.fd_half_l1(p_hat):.3f}; samples in no group: {(groups < 0).sum()}")
show(samples[:48], nrow=16, title="unconditional samples of the base model")
'''),
    md(r"""
## 2 · The indicator and the objective

The indicator is the authors' MLP on the flattened predicted noise (no $t$ input):

$$C:\ \hat\epsilon\in\mathbb R^{4\cdot 8\cdot 8}\ \to\ 1024\ \to\ 512\ \to\ K\ \text{logits},$$

and the fine-tuning loss, with the model's prediction $\hat\epsilon = \epsilon_\theta(z_t, t, c)$, is

$$\mathcal L = (1-\alpha)\,\|\hat\epsilon - \epsilon\|^2 + \alpha\,\mathrm{CE}\big(C(\hat\epsilon),\, y\big).$$

Both $\epsilon_\theta$ and $C$ minimise the CE (one AdamW over both). $\alpha = 0$ is the plain fine-tune.
The ablation beyond the paper reverses the gradient that flows from $C$ into $\epsilon_\theta$
(`grad_sign = -1`): $C$ still learns to read the group, the denoiser learns to hide it.
"""),
    code(r'''
latents = vae.encode_dataset(pipe.vae, pipe.run_dir.parent / pipe.cfg.vae, pipe.data_cfg, DEVICE)
z0, y = latents["z0"], latents["group"]                 # [2000, 4, 8, 8], [2000]
cfg = ddm.DDMConfig(**{**asdict(data_cfg), **ddm.PRESETS["biased-base"][PRESET], "protocol": "biased-base",
                       "alphas": "0,0.5", "adversarial": "0.5", "seeds": "0,1", "n_samples": 200})
model = ddm.arm_model(pipe, cfg, "fd", 2, seed=0)
print(model.indicator)

gen = torch.Generator().manual_seed(0)
idx = torch.randint(len(z0), (64,), generator=gen)
z_t, t, eps = ddpm.noisy_batch(model.scheduler, z0[idx], gen)               # [64, 4, 8, 8], [64], [64, 4, 8, 8]
null = torch.full((64,), model.unet.num_classes)                            # biased-base FD: the ∅ model
output, logits = model(z_t, t, null)                                        # ε̂ [64, 4, 8, 8], C(ε̂) [64, 2]
target = model.scheduler.target(z0[idx], eps, t)                            # ε
mse, ce = F.mse_loss(output, target), F.cross_entropy(logits, y[idx])
print(f"MSE term {mse:.4f}; CE term {ce:.4f} (an untrained indicator: ln 2 = {torch.log(torch.tensor(2.)):.4f})")
for alpha in (0.0, 0.2, 0.5):
    loss = ddm.ddm_loss(output, target, logits, y[idx], alpha)
    assert torch.isclose(loss, (1 - alpha) * mse + alpha * ce)
    print(f"  α = {alpha}: L = (1−α)·{mse:.4f} + α·{ce:.4f} = {loss:.4f}")

def unet_grad(sign):                                    # the CE's gradient reaching the denoiser
    model.zero_grad()
    F.cross_entropy(model(z_t, t, null, grad_sign=sign)[1], y[idx]).backward()
    return model.unet.out[-1].bias.grad.clone()
print("the CE's gradient on the UNet's last bias, cooperative vs adversarial:", unet_grad(1.0), unet_grad(-1.0))
'''),
    md(r"""
## 3 · A stacked sweep over α and seeds

`ddm.run_sweep` builds every arm of a scenario (each $\alpha$, the adversarial ablation, each seed) and
trains them as **one** model: `stack.Stacked` gives every trainable tensor a leading arm axis and runs the
arms with `torch.func.vmap`, so one optimiser step is exactly one step of every arm alone (the loss is the
sum of the arms' losses, AdamW and the EMA act element by element, clipping is per arm). Sampling runs all
arms in one batched loop, each arm with its own seeded noise; arms of one seed share their noise, so
differences between arms are paired. Two scenarios:

* **FD** — the arm fine-tunes the $\varnothing$ model and is scored by FD of its unconditional samples.
* **SPD** — the group is given as a condition (one new class row per group, label dropout 10%), sampled
  per group with CFG, and scored by $\mathrm{SPD} = |P(\text{success}\mid a) - P(\text{success}\mid b)|$.
"""),
    code(r'''
arms = ddm.sweep_arms(cfg, "fd")
print(len(arms), "FD arms:", ", ".join(a.name for a in arms))
stack = Stacked([ddm.arm_model(pipe, cfg, "fd", 2, a.seed) for a in arms])
print("a stacked tensor:", stack.names[0], tuple(stack.stacked[0].shape), "(arm axis first)")

start = time.perf_counter()
summary = ddm.run_sweep(cfg, PRESET, RUNS, DEVICE, evaluator=evaluator)    # prints the report's tables
report_dir = Path(RUNS) / cfg.dataset / "ddm-biased-base"
print(f"done in {time.perf_counter() - start:.0f} s; report: {report_dir / 'report.md'}")
'''),
    md(r"""
## 4 · Intervals across seeds, and the verdict

Each cell of the report is the mean over seeds with a 95% $t$-interval, $\bar x \pm t_{0.975,S-1}\,
\mathrm{sd}/\sqrt S$ (`metrics.seed_summary`); the bootstrap over samples (`metrics.bootstrap`) is kept
per seed in `metrics.json`. The verdict compares arms through their paired differences across seeds and
is written by `metrics.ddm_verdict`, with its rule fixed before any run:
"""),
    code(r'''
print(metrics.verdict_rule("FD"))
fd = summary["scenarios"]["fd"]
for v in fd["verdicts"]:
    print(f"  {v['kind']:11s} CFG {v['scale']:g}: {'lowers' if v['lowers'] else 'does not lower'} FD")
fig, ax = plt.subplots(figsize=(5, 3.2))
for kind, style in (("ddm", "o-"), ("adversarial", "s--")):
    mine = [r for r in fd["rows"] if r["kind"] == kind or (kind == "adversarial" and r["kind"] == "ddm" and r["alpha"] == 0)]
    p = torch.tensor([r["p0"]["mean"] for r in mine])
    lo, hi = torch.tensor([r["p0"]["lo"] for r in mine]), torch.tensor([r["p0"]["hi"] for r in mine])
    ax.errorbar([r["alpha"] for r in mine], p, yerr=[(p - lo).clamp_min(0), (hi - p).clamp_min(0)],
                fmt=style, capsize=4, label=kind)
ax.axhline(summary["reference"]["train_p_hat"][0], ls="--", c="gray", label="training share")
ax.axhline(0.5, ls=":", c="k", label="balanced")
ax.set(xlabel="α", ylabel="p̂(red), 95% interval over seeds", title="FD scenario")
ax.legend(fontsize=8);
'''),
    md(r"""
The authors' diagnostic, the entropy of the indicator on the arm's own samples (noised at a random $t$),
and its accuracy on real held-out latents per $t$-bin: at $\alpha = 0$ the indicator gets no gradient and
stays near chance ($\ln 2 \approx 0.693$); a low entropy means $\hat\epsilon$ carries the group.
"""),
    code(r'''
for scenario, res in summary["scenarios"].items():
    for r in res["rows"]:
        acc = ", ".join(f"{k[6:]}: {r[k]['mean']:.2f}" for k in r if k.startswith("C_acc_t"))
        print(f"{scenario} {r['kind']:11s} α={r['alpha']:<4g} C entropy {r['C_entropy']['mean']:.3f}; C acc {acc}")
'''),
    md(r"""
## 5 · The trade-off: fairness vs image quality

Quality is FID on the evaluation CNN's penultimate features ("FID-C"; for colored MNIST with the
foreground's mean color appended), the real test images reweighted to the arm's own group share:

$$\text{FID-C} = \|\mu_1-\mu_2\|^2 + \operatorname{tr}\!\big(S_1 + S_2 - 2\,(S_1^{1/2} S_2 S_1^{1/2})^{1/2}\big).$$

It is not Inception-FID. One panel per scenario: the $\alpha$ points joined in order, the adversarial
ablation dashed, the plain $\alpha = 0$ arm as a dotted reference line.
"""),
    code(r'''
display(Image(filename=str(report_dir / "tradeoff.png"), width=700))
'''),
    md(r"""
## 6 · Samples of every arm

`grids/` in the report folder: 64 samples per arm of the first seed (SPD arms: the two conditions mixed).
Look at them: a metric can be fooled (collapsed samples can read as balanced).
"""),
    code(r'''
paths = sorted((report_dir / "grids").glob("fd_*.png"))
fig, axes = plt.subplots(1, len(paths), figsize=(3 * len(paths), 3.3))
for ax, path in zip(axes, paths):
    ax.imshow(plt.imread(path))
    ax.set_title(path.stem.replace("fd__", "").replace("_", " "), fontsize=8)
    ax.axis("off")
'''),
    md(r"""
## 7 · Full-scale results (committed GPU runs)

The tiny numbers above come from a model trained for seconds: they show the machinery, not the effect.
The runs of `python ddm.py --dataset ...` on a GPU are committed under `results/`; this cell reads the
verdicts from their `metrics.json` (protocol `prior`: the authors' regime), then the earlier reports.
"""),
    code(r'''
for path in sorted(Path("results").glob("**/metrics.json")):
    m = json.loads(path.read_text())
    if "protocol" not in m:
        continue
    print(f"{path.parent} · {m['dataset']} · protocol {m['protocol']} · {m['device']}")
    for scenario, res in m["scenarios"].items():
        for v in res["verdicts"]:
            print(f"   {scenario.upper()} train {v['ratio'] or 'data'} CFG {v['scale']:g} {v['kind']}: "
                  f"{'lowers' if v['lowers'] else 'does not lower'}")
'''),
    md(r"""
The earlier single-seed reports (protocol `biased-base`, one H100), each shown from its own `metrics.json`:
"""),
    committed_results("ddm"),
]

# ===================================================================================== 03 InvDiff
NB3 = [
    md(r"""
# 3 · InvDiff: invariant guidance without group labels

InvDiff (Hou et al. 2024, arXiv 2412.08480) keeps the biased diffusion model **frozen** and trains a small
guidance module next to it. No stage is given the bias attribute (the color): environments are inferred
from the frozen model's own losses, and the module is trained so its loss is the same across them.
The true groups are read only for diagnostics and the evaluation.

The base model here is notebook 1's class-conditional model ($c$ = digit), reused from the run folder.
"""),
    setup("import data\nimport ddpm\nimport evaluate\nimport invdiff\nimport vae\nfrom functools import partial\n"
          "from train import load_checkpoint"),
    md(r"""
## 1 · Environments without labels

A per-image loss of the frozen model over $M$ fixed draws $(t_m, \epsilon_m)$, each draw divided by its
mean over images so that $\ell_i$ ranks images rather than timesteps:

$$\ell_i = \frac1M\sum_m \frac{\|\epsilon_\theta(z_{t_m}, t_m, c_i) - \epsilon_{m,i}\|^2}{\operatorname{mean}_j \|\epsilon_\theta(\cdot) - \epsilon_{m,j}\|^2}.$$

Soft memberships $W\in\Delta^K$ (one row per image) then maximise the spread of the environment risks,

$$R_k = \frac{\sum_i w_{ik}\,\ell_i}{\sum_i w_{ik}},\qquad \max_W\ \operatorname{std}_k R_k,$$

by Adam, projecting each row back onto the simplex after every step. The idea: the minority group is
modelled worse, so its images have higher loss and collect in the high-risk environment.
"""),
    code(r'''
data_cfg = data.DataConfig(dataset="cmnist")
pipe = ddpm.ensure_base(ddpm.base_config(data_cfg, PRESET), PRESET, RUNS, DEVICE)   # notebook 1's model
cfg = invdiff.InvDiffConfig(**{**asdict(data_cfg), **invdiff.PRESETS[PRESET], "samples_per_class": 40})
latents = vae.encode_dataset(pipe.vae, pipe.run_dir.parent / pipe.cfg.vae, pipe.data_cfg, DEVICE)
z0, label, group = latents["z0"], latents["label"], latents["group"]     # group: hidden, diagnostics only
K, names = latents["num_classes"], invdiff.group_names(data_cfg)
base = pipe.unet.eval().requires_grad_(False)                             # ε_θ, frozen
scheduler = ddpm.build_scheduler(pipe.cfg, "ddpm")

gen = torch.Generator().manual_seed(cfg.seed)          # the same draws as run_experiment below
losses = invdiff.per_sample_losses(base, scheduler, z0, label, draws=cfg.env_draws, form=cfg.env_loss, generator=gen)
W = invdiff.infer_environments(losses, cfg.envs, cfg.env_iters, cfg.env_lr, gen)   # [2000, 2]
print(f"ℓ {tuple(losses.shape)}, W {tuple(W.shape)}; rows sum to 1: {torch.allclose(W.sum(1), torch.ones(len(W)))}")
table = invdiff.environment_table(W, group, losses)
display(Markdown(invdiff.environment_markdown(table, names)))
'''),
    md(r"""
How the inferred environments line up with the hidden groups. **Purity** $=\sum_k \max_g n_{kg}/N$ (hard
assignment $\arg\max_k w_{ik}$) cannot drop below the majority share (0.8 here, one environment holding
everything), so also compare each environment's share of green images with the overall 20%, and with the
same $W$ shuffled over images (same sizes, no information):
"""),
    code(r'''
shuffled = invdiff.environment_table(W[torch.randperm(len(W), generator=torch.Generator().manual_seed(0))], group, losses)
fig, (ax0, ax1, ax2) = plt.subplots(1, 3, figsize=(13, 3.2))
for g, name in enumerate(names):
    ax0.hist(losses[group == g].numpy(), bins=40, alpha=0.6, color=name, density=True, label=f"{name} (hidden)")
ax0.set(xlabel="ℓ_i", title="per-image loss by true group"); ax0.legend(fontsize=8)
confusion = torch.tensor(table["confusion"])           # [environments, groups]
ax1.imshow(confusion, cmap="Blues")
for k in range(confusion.shape[0]):
    for g in range(confusion.shape[1]):
        ax1.text(g, k, str(confusion[k, g].item()), ha="center", va="center")
ax1.set(xticks=range(len(names)), xticklabels=names, yticks=range(cfg.envs), xlabel="true group",
        ylabel="inferred environment", title=f"confusion (purity {table['purity']:.3f})")
for offset, (tab, name) in zip((-0.2, 0.2), ((table, "inferred"), (shuffled, "shuffled W"))):
    c = torch.tensor(tab["confusion"]).float()
    ax2.bar(torch.arange(cfg.envs) + offset, c[:, 1] / c.sum(1).clamp_min(1), width=0.4, label=name)
ax2.axhline(float((group == 1).float().mean()), ls="--", c="gray", label="overall")
ax2.set(xticks=range(cfg.envs), xlabel="environment", ylabel=f"share of {names[1]}", title="minority share per environment")
ax2.legend(fontsize=8)
print(f"purity: inferred {table['purity']:.3f}, shuffled {shuffled['purity']:.3f}, majority share {table['majority_share']:.3f}")
'''),
    md(r"""
## 2 · The guidance module and the invariance objective

$G_\psi(z_t, t, c)$ is a UNet with the base model's layout at ¼ of its channels, its last conv
zero-initialised. Its output is mixed with the frozen prediction as in the authors' code ("convex", $r = 0.8$):

$$\tilde\epsilon = r\,G_\psi(z_t, t, c) + (1-r)\,\epsilon_\theta(z_t, t, c),$$

and only $\psi$ is trained, on the min step of InvDiff with the rows of $W$ fixed:

$$\ell_i = \|\tilde\epsilon_i - \epsilon_i\|^2,\qquad \mathcal L = \operatorname{mean}_k R_k + \lambda\,\operatorname{Var}_k R_k\quad(\lambda = 1).$$

With $\lambda = 0$ this is still the environment-balanced mean, so the `lambda0` arm isolates the variance
term. One batch, through the project's functions:
"""),
    code(r'''
module = invdiff.build_module(pipe.cfg, K, cfg.module_width, z0.shape[1])
n_base, n_module = sum(p.numel() for p in base.parameters()), sum(p.numel() for p in module.parameters())
print(f"ε_θ {n_base:,} parameters (frozen), G_ψ {n_module:,} ({n_module / n_base:.1%})")

gen = torch.Generator().manual_seed(1)
idx = torch.randint(len(z0), (64,), generator=gen)
z_t, t, eps = ddpm.noisy_batch(scheduler, z0[idx], gen)                    # [64, 4, 8, 8], [64], [64, 4, 8, 8]
eps_tilde = invdiff.guided_prediction(base, module, z_t, t, label[idx], r=cfg.guidance_weight, form=cfg.guidance_form)
with torch.no_grad():
    eps_theta = base(z_t, t, label[idx])
assert torch.allclose(eps_tilde, (1 - cfg.guidance_weight) * eps_theta)    # G_ψ = 0 at the start
print(f"ε̃ {tuple(eps_tilde.shape)}; at initialisation ε̃ = (1 − r)·ε_θ because G_ψ's last conv is zero")

per_image = (eps_tilde - eps).square().mean((1, 2, 3))                     # ℓ_i [64]
R = invdiff.environment_risks(per_image, W[idx])                           # [K]
loss = invdiff.invariance_loss(per_image, W[idx], cfg.lam)
assert torch.isclose(loss, R.mean() + cfg.lam * R.var())
print(f"R_k = {[round(r, 4) for r in R.tolist()]}: mean {R.mean():.4f} + λ·Var {cfg.lam * R.var():.6f} = {loss:.4f}")
loss.backward()
assert all(p.grad is None for p in base.parameters())                      # nothing reaches the frozen model
print(f"gradient reaches G_ψ only: ‖∇ψ‖ = {sum(p.grad.norm() ** 2 for p in module.parameters() if p.grad is not None) ** 0.5:.4f}")
'''),
    md(r"""
## 3 · Training the arms

`invdiff.run_experiment` repeats the environment inference above (same seed, same $W$), then trains one
guidance module per arm with the same steps and seed, and samples 40 images per digit from the same seeds:

| arm | what it is |
| --- | --- |
| `base` | the frozen model alone (r = 0, nothing trained): *before* |
| `invdiff` | $G_\psi$ on the inferred environments, $\lambda = 1$: *after* |
| `lambda0` | the same with $\lambda = 0$ (only the environment-balanced mean) |
| `random` | $W$'s rows shuffled over images: same sizes, no information |
| `oracle` | $W$ = the true groups (one-hot): the upper bound, using the hidden labels |

Guided sampling is DDIM with $\tilde\epsilon$ in both passes of classifier-free guidance,
$\tilde\epsilon_{\text{cfg}} = \tilde\epsilon(z_t, t, \varnothing) + s\,(\tilde\epsilon(z_t, t, c) - \tilde\epsilon(z_t, t, \varnothing))$, $s = 2$.
"""),
    code(r'''
start = time.perf_counter()
metrics = invdiff.run_experiment(cfg, pipe, RUNS, PRESET, DEVICE)          # prints the environments and the table
report_dir = Path(RUNS) / cfg.dataset / "invdiff"
assert metrics["environments"]["confusion"] == table["confusion"]         # the same W as in section 1
print(f"{len(metrics['arms'])} arms in {time.perf_counter() - start:.0f} s; report: {report_dir / 'report.md'}")
'''),
    md(r"""
## 4 · Guided vs unguided sampling of the frozen model

The `invdiff` arm's trained module, loaded from its run folder, against the frozen model alone: the same
seed gives both the same starting noise, one row per digit. In the convex form $G_\psi$ supplies 80% of
$\tilde\epsilon$ and starts from zero, so a module trained for the tiny preset's 150 steps has not yet
learned to denoise and its samples are far noisier than the base model's; the GPU runs train it for thousands
of steps.
"""),
    code(r'''
module = invdiff.build_module(pipe.cfg, K, cfg.module_width, z0.shape[1])
module.load_state_dict(load_checkpoint(Path(metrics["arm_runs"]["invdiff"]) / "ckpt.pt")["ema_model"])
guided = partial(invdiff.guided_prediction, base, module.eval(), r=cfg.guidance_weight, form=cfg.guidance_form)
sampling = dict(seed=1, guidance_scale=cfg.guidance_scale, steps=cfg.sample_steps)
before = invdiff.sample_classes(pipe, None, K, 6, **sampling)            # {digit: uint8 [6, 3, 32, 32]}
after = invdiff.sample_classes(pipe, guided, K, 6, **sampling)
evaluator = evaluate.get_evaluator(data_cfg, RUNS, DEVICE, epochs=cfg.eval_epochs or None)   # cached by run_experiment
fig, axes = plt.subplots(1, 2, figsize=(5.5, 4.6))
for ax, (name, images) in zip(axes, (("frozen ε_θ (base)", before), ("ε̃ with G_ψ (invdiff)", after))):
    x = torch.cat(list(images.values()))                                  # [60, 3, 32, 32]
    p = evaluate.group_shares(evaluator.groups(x), 2)
    show(x, nrow=6, title=f"{name}\np̂(red) = {p[0]:.2f} in this grid", ax=ax)
'''),
    md(r"""
## 5 · FD, Bias and FID-C before and after

On the pooled class-conditional samples of each arm: $\hat p$ and $\mathrm{FD} = |\hat p_0 - 0.5|$ with
bootstrap 95% intervals, InvDiff's per-condition bias
$\mathrm{Bias}_p = \sum_{i<j}|n_i - n_j| / N_p / \binom K2$ (mean ± std over the digits), the share of
samples read as the requested digit (cond acc), and FID-C (quality, as in notebook 2):
"""),
    code(r'''
display(Markdown(evaluate.format_table(metrics)))
arms = metrics["arms"]
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3.2))
fd = torch.tensor([a["FD_half_l1"] for a in arms])
lo, hi = (torch.tensor([a["FD_half_l1_ci"][k] for a in arms]) for k in (0, 1))
ax0.bar([a["name"] for a in arms], fd, yerr=[(fd - lo).clamp_min(0), (hi - fd).clamp_min(0)], capsize=4)
ax0.axhline(metrics["reference"]["train_FD_half_l1"], ls="--", c="gray", label="training data")
ax0.set(ylabel="FD_half_l1 (95% CI)", title="fairness (lower is fairer)"); ax0.legend(fontsize=8)
ax1.bar([a["name"] for a in arms], [a["FID_C"] for a in arms], color="tab:orange")
ax1.axhline(metrics["reference"]["FID_C_floor"], ls=":", c="gray", label="real vs real")
ax1.set(ylabel="FID-C", title="quality (lower is better)"); ax1.legend(fontsize=8)
by_name = {a["name"]: a for a in arms}
print(f"before (base): FD {by_name['base']['FD_half_l1']:.3f}, FID-C {by_name['base']['FID_C']:.1f}; "
      f"after (invdiff): FD {by_name['invdiff']['FD_half_l1']:.3f}, FID-C {by_name['invdiff']['FID_C']:.1f}")
display(Image(filename=str(report_dir / "tradeoff.png"), width=440))
'''),
    md(r"""
## 6 · Full-scale results (committed GPU runs)

The tiny run trains each module for 150 steps and scores 400 samples per arm: it shows the machinery,
not the effect. The GPU runs of `python invdiff.py --dataset cmnist` (and CelebA) are committed under
`results/`; this cell reads their `metrics.json`.
"""),
    committed_results("invdiff"),
]

NOTEBOOKS = {"01_latent_diffusion.ipynb": NB1, "02_ddm.ipynb": NB2, "03_invdiff.ipynb": NB3}


def build(cells):
    return new_notebook(cells=cells, metadata=KERNEL)


def execute(path: Path, runs: str):
    """Run a notebook top to bottom from the repository root and save it with its outputs."""
    from nbclient import NotebookClient
    nb = nbformat.read(path, as_version=4)
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}   # the notebooks pick the inline backend
    env["FAIRDIFF_RUNS"] = runs
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}},
                            coalesce_streams=True, record_timing=False)   # progress bars: their final state
    start = time.perf_counter()
    client.execute(env=env)
    nbformat.write(nb, path)
    print(f"{path.name}: executed in {time.perf_counter() - start:.0f} s, {path.stat().st_size / 1e6:.2f} MB")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--execute", action="store_true", help="run each notebook and save it with outputs")
    p.add_argument("--runs", default="runs", help="run folder shared by the three notebooks ($FAIRDIFF_RUNS)")
    args = p.parse_args()
    for name, cells in NOTEBOOKS.items():
        nbformat.write(build(cells), HERE / name)
        if args.execute:
            execute(HERE / name, str(Path(args.runs).resolve()))


if __name__ == "__main__":
    main()
