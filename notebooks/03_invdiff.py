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
# # 3 · InvDiff: invariant guidance without group labels
#
# InvDiff (Hou et al. 2024, arXiv 2412.08480) keeps a biased diffusion model **frozen** and trains a guidance
# module $G_\psi$ next to it. No stage is given the bias attribute $y$ (here the color): environments are
# inferred from the frozen model's own per-image losses, and $G_\psi$ is trained so that its loss is the same
# in every environment. The true groups are read only by the diagnostics, the oracle arms and the evaluation.
#
# `python invdiff.py --dataset cmnist` runs the method in the authors' configuration on a GPU. This notebook
# steps through the same code on a CPU with the `tiny` preset, in a few minutes: the spuriously colored data,
# the frozen base model, three forms of the per-image loss, the environments they give and the weights the
# objective then puts on each image, the guidance module, a stacked training of every arm, and the whole
# experiment with the verdict its report writes.

# %%
import json
import sys
import time
from dataclasses import asdict, replace
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
import environments
import evaluate
import invdiff
import invdiff_report
import metrics
import unet
import vae
from config import config_hash
# %matplotlib inline
import matplotlib.pyplot as plt   # after the imports: ddpm.py selects the file-only Agg backend for its CLI
from IPython.display import Image, Markdown, display
from torchvision.io import ImageReadMode, encode_jpeg, read_image

# %% [markdown]
# ## 1 · Colored MNIST with a spurious color
#
# In notebooks 1 and 2 the color was biased overall (80% red). InvDiff's setting ties the color to the
# *condition* instead. Each digit $d$ has a majority color $m(d) = d \bmod G$ (with $G = 2$ colors: even
# digits red, odd digits green), which a training image keeps with probability $\rho$:
#
# $$P\big(y = m(d)\mid d\big) = \rho = 0.9,$$
#
# and otherwise it takes another color. Over all digits both colors stay about half, so the unconditional FD
# of notebook 2 sees almost no bias: the bias lives *within* each class. InvDiff measures it per condition
# $c$ from the group counts $n_g$ of the $N_c$ samples of that condition,
#
# $$\mathrm{Bias}_c = \frac{\sum_{i<j}|n_i - n_j|}{N_c\,\binom G2}\qquad(= |2\hat p_c - 1|\ \text{for two groups}),$$
#
# 0 when balanced, 1 when every sample of $c$ has one color. An image is **bias-conflicting** when its color
# is not the most common one of its class: about $1-\rho$ of the training images. The held-out test split
# stays balanced 50/50 and independent of the digit.

# %%
data_cfg = data.DataConfig(dataset="cmnist", spurious=invdiff.SPURIOUS)      # ρ = 0.9, colors red,green
base_cfg = ddpm.base_config(data_cfg, PRESET)                                 # the tiny base model (2000 images)
train = data.load(ddpm.data_config(base_cfg), "train")                        # exactly what the base trains on
test = data.load(data_cfg, "test")
conflict = invdiff_report.conflicting(train.label, train.group)               # bool [2000], hidden
names = train.group_names
print(f"train {len(train)} images: {names[0]} {metrics.group_shares(train.group, 2)[0]:.3f} overall, "
      f"{conflict.float().mean():.3f} bias-conflicting; test {len(test)} images")
counts = {split: torch.stack([torch.bincount(s.group[s.label == d], minlength=2) for d in range(10)])
          for split, s in (("train", train), ("test", test))}                 # [10 digits, 2 groups]
bias_train = torch.tensor([metrics.bias_score(n) for n in counts["train"]])  # Bias_c per digit
print("Bias_c of the training data per digit:", [round(b, 2) for b in bias_train.tolist()])

fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 2.8), width_ratios=[1.4, 1])
columns = torch.stack([(train.label == d).nonzero()[:6, 0] for d in range(10)], 1).flatten()   # 6 per digit
show(train.images[columns], nrow=10, title="training images, one column per digit", ax=ax0)
for offset, split in ((-0.2, "train"), (0.2, "test")):
    c = counts[split].float()
    ax1.bar(torch.arange(10) + offset, c[:, 0] / c.sum(1), width=0.4, label=split)
ax1.axhline(0.5, ls=":", c="k")
ax1.set(xlabel="digit", ylabel=f"share {names[0]}", xticks=range(10), title="color share per digit")
ax1.legend(fontsize=8);

# %% [markdown]
# ## 2 · The frozen base model
#
# The base model is notebook 1's class-conditional $\epsilon_\theta(z_t, t, c)$ ($c$ = digit, the same tiny
# preset), trained on these images. Its config differs from notebook 1's (the `spurious` field is part of
# the base model's config hash), so `ensure_base` trains a new base model, about half a minute on a CPU, or
# reuses it from the run folder; the autoencoder is bias-neutral (trained on balanced data, whatever the
# colors' tie to the digits), so notebook 1's is reused. From here on $\epsilon_\theta$ is frozen.
#
# Every InvDiff setting of this notebook is one `InvDiffConfig`: the tiny preset, shortened as the end-to-end
# test in `tests/test_invdiff.py` shortens it (10 training steps, 4 samples per class, 50 Adam steps on $W$,
# the environment table at $K = 2$, $\lambda \in \{0, 1\}$, sampling at $r = 0.5$).
#
# Does the base reproduce the tie? Class-conditional samples with classifier-free guidance ($s = 2$), their
# color read from the pixels by notebook 2's evaluator:

# %%
start = time.perf_counter()
pipe = ddpm.ensure_base(base_cfg, PRESET, RUNS, DEVICE)                       # trains or reuses
base = pipe.unet.eval().requires_grad_(False)                                 # ε_θ, frozen
scheduler = ddpm.build_scheduler(pipe.cfg, "ddpm")
latents = vae.encode_dataset(pipe.vae, pipe.run_dir.parent / pipe.cfg.vae, pipe.data_cfg, DEVICE)
z0, label, group = latents["z0"], latents["label"], latents["group"]         # [2000, 4, 8, 8], [2000], [2000]
assert torch.equal(group, train.group) and torch.equal(label, train.label)   # the same images, in order
print(f"{time.perf_counter() - start:.0f} s; {pipe.run_dir}")

cfg = invdiff.InvDiffConfig(**{**asdict(data_cfg), **invdiff.PRESETS[PRESET],
                               "steps": 10, "samples_per_class": 4, "env_iters": 50, "table_envs": "2",
                               "lams": "0,1", "sample_ratios": "0.5",
                               "report": str(Path(RUNS) / data_cfg.dataset / "invdiff-notebook")})
scale = float(cfg.guidance_scales)                                            # CFG s = 2
evaluator = evaluate.get_evaluator(pipe.data_cfg, RUNS, DEVICE, epochs=cfg.eval_epochs or None)   # notebook 2 cached it
cond = torch.arange(10).repeat_interleave(20)                                 # 20 samples per digit
samples = pipe.sample(len(cond), cond, seed=0, steps=cfg.sample_steps, guidance_scale=scale)
read = evaluator.groups(samples)                                              # [200]: 0 red, 1 green, -1 none
bias_base = torch.tensor([metrics.bias_score(torch.bincount(read[(cond == d) & (read >= 0)], minlength=2))
                          for d in range(10)])
print(f"mean Bias_c: training data {bias_train.mean():.3f}, base samples {bias_base.mean():.3f}")

fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 2.8), width_ratios=[1.4, 1])
show(samples.view(10, 20, 3, 32, 32)[:, :6].transpose(0, 1).flatten(0, 1), nrow=10,
     title=f"base samples, CFG {scale:g}: one column per digit", ax=ax0)
ax1.bar(torch.arange(10) - 0.2, bias_train, width=0.4, label="training data")
ax1.bar(torch.arange(10) + 0.2, bias_base, width=0.4, label="base samples")
ax1.set(xlabel="digit", ylabel="Bias_c", xticks=range(10), title="bias per condition")
ax1.legend(fontsize=8);

# %% [markdown]
# ## 3 · Per-image losses of the frozen model, in three forms
#
# InvDiff's premise: the frozen model fits the bias-conflicting images worse, so a per-image loss $\ell_i$
# should be higher for them, and environments built from $\ell$ should separate them without labels.
# `environments.per_sample_losses` offers three forms ($\|\cdot\|^2$ the mean over latent elements):
#
# * `authors` (the authors' code): one $t\sim U\{0..T-1\}$ and one $\epsilon$ per image, and the prediction is
#   compared with the **clean latent**, not with the noise:
#   $\ell_i = \|\hat\epsilon_\theta(z_t, t, c_i) - z_{0,i}\|^2$;
# * `eps-grid`: the denoising loss on $M = 8$ fixed timesteps $t_m = (m+\frac12)\,T/M$, each draw divided by
#   its mean over the images, so that every $t$ weighs the same:
#   $\ell_i = \frac1M\sum_m \|\hat\epsilon_\theta(z_{t_m}, t_m, c_i) - \epsilon_m\|^2 \,/\, \operatorname{mean}_j\|\cdot\|^2$;
# * `eps-window`: the denoising loss on $M$ draws $t_m\sim U[0, 250)$, the low-noise end:
#   $\ell_i = \frac1M\sum_m \|\hat\epsilon_\theta(z_{t_m}, t_m, c_i) - \epsilon_m\|^2$.
#
# How well a form ranks the conflicting images first is its AUC (Mann–Whitney, ties counted half):
#
# $$\mathrm{AUC} = P\big(\ell_i > \ell_j \mid i\ \text{conflicting},\ j\ \text{aligned}\big),$$
#
# 0.5 for a loss that carries no information about them. The draws come from the first seed's generator, as
# in `run_experiment` below. One more reference, without any model: once $\hat\epsilon \approx \epsilon$, the
# authors' form reads $\|\epsilon - z_0\|^2 \approx 1 + \|z_0\|^2$, so it ranks images much as the latent's norm
# $\|z_0\|^2$ alone does (the `z0-norm` row of the report's table).

# %%
window = tuple(int(t) for t in cfg.env_window.split(","))                     # eps-window's t range
losses = {form: environments.per_sample_losses(base, scheduler, z0, label, form=form, draws=cfg.env_draws,
                                               window=window, generator=torch.Generator().manual_seed(0))
          for form in environments.ENV_LOSSES}                                # ℓ [2000] per form
fig, axes = plt.subplots(1, 3, figsize=(13, 2.8))
for ax, (form, loss) in zip(axes, losses.items()):
    bins = torch.linspace(0, loss.quantile(0.99).item(), 40).numpy()
    for name, mine in (("aligned", ~conflict), ("conflicting", conflict)):
        ax.hist(loss[mine].numpy(), bins=bins, density=True, alpha=0.6, label=name)
    ax.set(xlabel="ℓ_i", title=f"{form}: AUC {invdiff_report.auc(loss, conflict):.3f}")
    ax.legend(fontsize=8)
for form, loss in losses.items():
    print(f"{form:10s} mean ℓ: aligned {loss[~conflict].mean():.4f}, conflicting {loss[conflict].mean():.4f}")
print(f"‖z0‖² alone: AUC {invdiff_report.auc(z0.square().mean((1, 2, 3)), conflict):.3f}")

# %% [markdown]
# ## 4 · Environments at K = 8, and the weight the objective puts on each image
#
# **The max step.** Soft memberships $W\in\Delta^K$, one row per image, maximise the spread of the environment
# risks plus $\beta$ times the smallest weighted loss:
#
# $$R_k = \frac{\sum_i w_{ik}\,\ell_i}{\sum_i w_{ik}},\qquad
#   \max_W\ \operatorname{std}_k R_k + \beta\,\min_{i,k} w_{ik}\ell_i\qquad(K = 8,\ \beta = 3),$$
#
# by Adam from $W_0\sim U(0,1)$, clamping $W$ at 0 and renormalising each row after every step
# (`environments.infer_environments`, which never sees $y$). The $\beta$ term's gradient reaches one entry a
# step, so many entries still end at exactly 0.
#
# **What the min step then does with them.** $G_\psi$ is trained on
# $\mathcal L = \operatorname{mean}_k R_k + \lambda\operatorname{Var}_k R_k$ with the guided model's losses
# $\ell_i$. Its weight on image $i$ is
#
# $$v_i = \frac{\partial\mathcal L}{\partial\ell_i} = \sum_k \frac{w_{ik}}{S_k}\Big(\frac1K + \frac{2\lambda\,(R_k - \bar R)}{K-1}\Big),
#   \qquad S_k = \sum_i w_{ik}.$$
#
# With equal-size environments and $\lambda = 0$ every image weighs $1/N$: plain ERM. $\lambda$ alone tilts
# the weights towards the high-risk environments, and once $2\lambda(\bar R - R_k)/(K-1) > 1/K$ the images
# of environment $k$ get a **negative** weight: the objective rewards fitting them worse. The table reads the
# weights where $\ell_i$ is the base's own $\epsilon$-loss (`eps-grid` without the normalisation: the
# objective's $\ell_i$ once $\tilde\epsilon = \epsilon_\theta$), as the **minority weight**
# $\sum_{i\ \text{conflicting}} v_i / \sum_i v_i$ and the share of images with $v_i < 0$. Two references: one
# environment (ERM) gives the conflicting images their share of the data; the oracle cells $c\times y$
# (20 environments, built from the hidden labels) give them ½ at $\lambda = 0$.

# %%
lams = [float(lam) for lam in invdiff.InvDiffConfig().lams.split(",")]      # the full sweep's λ: 0, 1, 10, 100
W = {form: environments.infer_environments(loss, cfg.envs, cfg.env_iters, cfg.env_lr, cfg.env_beta,
                                           torch.Generator().manual_seed(0))
     for form, loss in losses.items()}                                        # [2000, 8] per form
objective = environments.per_sample_losses(base, scheduler, z0, label, form="eps-grid", draws=cfg.env_draws,
                                           normalise=False, generator=torch.Generator().manual_seed(0))
table = invdiff_report.environment_table({(form, cfg.envs): (losses[form], W[form]) for form in losses},
                                         label, group, objective, lams)
display(Markdown(invdiff_report.environment_markdown(table)))

# %% [markdown]
# The same table as curves over $\lambda$ (left, middle), and the weights themselves (right): $N\cdot v_i$ of
# every image under the `eps-grid` environments, sorted. A weight of 1 is ERM's; the part of a curve below 0
# is the share of images the objective rewards fitting worse. Since $\sum_i v_i = 1$, a minority weight above
# 1 means that the aligned images' weights sum to less than zero.

# %%
fig, (ax0, ax1, ax2) = plt.subplots(1, 3, figsize=(14, 3.2), layout="constrained")
for row in table["rows"]:
    curve = f"{row['form']} (K={row['K']})"
    ax0.plot(range(len(lams)), [row[f"minority_share_lam{lam:g}"] for lam in lams], marker="o", label=curve)
    ax1.plot(range(len(lams)), [row[f"negative_lam{lam:g}"] for lam in lams], marker="o", label=curve)
ax0.axhline(conflict.float().mean(), ls=":", c="gray", label="share in the data")
for ax, ylabel in ((ax0, "minority weight"), (ax1, "share of images with v_i < 0")):
    ax.set(xticks=range(len(lams)), xticklabels=[f"{lam:g}" for lam in lams], xlabel="λ", ylabel=ylabel)
ax0.legend(fontsize=7)
for lam in lams:
    v = invdiff_report.effective_weights(objective, W["eps-grid"], lam) * len(objective)   # N·v_i [2000]
    ax2.plot(torch.linspace(0, 1, len(v)), v.sort().values, label=f"λ = {lam:g}")
ax2.axhline(0, c="k", lw=0.8)
ax2.set(xlabel="images, sorted by weight", ylabel=f"N·v_i (eps-grid, K = {cfg.envs})")
ax2.legend(fontsize=7);

# %% [markdown]
# ## 5 · The guidance module: a zeroed copy of the base
#
# $G_\psi(z_t, t, c)$ is a copy of the frozen base with its output convolution set to zero (the authors';
# `module="small"` would be a fresh UNet at a quarter of the channels). Its output is mixed with the frozen
# prediction,
#
# $$\tilde\epsilon = r\,G_\psi(z_t, t, c) + (1-r)\,\epsilon_\theta(z_t, t, c)\quad\text{(convex)}\qquad\text{or}\qquad
#   \tilde\epsilon = \epsilon_\theta + r\,G_\psi\quad\text{(additive)},$$
#
# trained at $r = 0.5$ and sampled at $r\in\{0.5, 0.8\}$: the authors' training script leaves its wrapper's 0.5
# in place, their sampling script passes 0.8. At step 0 $G_\psi \equiv 0$,
# so the convex form starts from $\tilde\epsilon = (1-r)\,\epsilon_\theta$, half the base's prediction at the
# training ratio: every trained arm, ERM included, first has to learn $\epsilon_\theta$ back. The additive form
# starts from $\epsilon_\theta$ itself. If training reaches $0.5\,G_\psi + 0.5\,\epsilon_\theta = \epsilon^*$,
# sampling at $r = 0.8$ gives $\epsilon_\theta + 1.6\,(\epsilon^* - \epsilon_\theta)$: the correction extrapolated.
#
# The min step on one batch of 64 images, with fixed rows of $W$, for each arm of the first seed (its
# environments come from `invdiff.arm_environments`, padded with zero columns to a common $K$):
#
# $$\ell_i = \|\tilde\epsilon_i - \epsilon_i\|^2,\qquad \mathcal L = \operatorname{mean}_k R_k + \lambda\,\operatorname{Var}_k R_k,$$
#
# the mean and the unbiased variance over the environments that have weight in the batch. `invariance_loss`
# takes a leading arm axis: losses $[A, B]$, $W$ $[A, B, K]$ and $\lambda$ $[A]$ give one loss per arm.

# %%
module = invdiff.build_module(base, pipe.cfg, cfg.module)                     # "copy": the base, output conv zeroed
guided = invdiff.Guided(base, module, cfg.guidance_form)                      # convex
small = invdiff.build_module(base, pipe.cfg, "small", cfg.module_width)
print(f"ε_θ {unet.count_parameters(base):,} parameters (frozen); G_ψ as a copy {unet.count_parameters(module):,}, "
      f"as a small UNet {unet.count_parameters(small):,}")

gen = torch.Generator().manual_seed(1)
idx = torch.randint(len(z0), (64,), generator=gen)
z_t, t, eps = ddpm.noisy_batch(scheduler, z0[idx], gen)                      # [64, 4, 8, 8], [64], [64, 4, 8, 8]
with torch.no_grad():
    eps_theta = base(z_t, t, label[idx])
    for r in (cfg.train_ratio, 0.8):
        assert torch.equal(guided(z_t, t, label[idx], r), (1 - r) * eps_theta)            # convex: (1 − r)·ε_θ
    assert torch.equal(invdiff.Guided(base, module, "additive")(z_t, t, label[idx], 0.8), eps_theta)
    print(f"step 0: ε̃ = (1 − r)·ε_θ (convex), ε̃ = ε_θ (additive); on this batch ‖ε_θ − ε‖² = "
          f"{(eps_theta - eps).square().mean():.4f}, ‖ε_θ/2 − ε‖² = {(eps_theta / 2 - eps).square().mean():.4f}")

arms = invdiff.sweep_arms(replace(cfg, seeds="0"))                            # the first seed's six arms
envs = invdiff.arm_environments(arms, {0: W[cfg.env_loss]}, invdiff.oracle_cells(label, group, len(names)), label)
per_image = (guided(z_t, t, label[idx], cfg.train_ratio) - eps).square().mean((1, 2, 3))   # ℓ_i [64]
W_batch = torch.stack([e[idx] for e in envs])                                 # [6, 64, K_max]
lam = torch.tensor([arm.lam for arm in arms])                                 # [6]
loss = invdiff.invariance_loss(per_image.expand(len(arms), -1), W_batch, lam)   # [6]
for a, arm in enumerate(arms):
    R = invdiff.environment_risks(per_image, W_batch[a])                      # [K_max]
    R = R[W_batch[a].sum(0) > 0]                                              # the environments in this batch
    assert torch.isclose(loss[a], R.mean() + arm.lam * (R.var() if len(R) > 1 else 0))
    print(f"  {arm.name:13s} {len(R):2d} environments in the batch: mean R_k {R.mean():.4f}, L = {loss[a]:.4f}")
base.zero_grad(set_to_none=True)                                              # (left over if the base trained here)
loss.sum().backward()
assert all(p.grad is None for p in base.parameters())                         # nothing reaches the frozen model
print(f"gradient reaches G_ψ only: ‖∇ψ‖ = {sum(p.grad.norm() ** 2 for p in module.parameters() if p.grad is not None) ** 0.5:.4f}")

# %% [markdown]
# ## 6 · Every arm as one stacked model
#
# | arm | environments | $\lambda$ |
# | --- | --- | --- |
# | `base` | the frozen model alone, no module ($r = 0$) | – |
# | `erm` | one environment: uniform weights | 0 |
# | `inferred` | $W$ from the frozen model's losses (§4) | 0 and 1 here; 0, 1, 10, 100 on a GPU |
# | `random` | $W$'s rows shuffled among the images of each class: the same sizes and class mix, no other information | 1 |
# | `oracle` | one-hot true cells $c\times y$ (the upper bound, reads the hidden labels) | 0 and 1 |
#
# `invdiff.train_arms` trains them as **one** model: `stack.Stacked` gives every trainable tensor of $G_\psi$ a
# leading arm axis and the loss is the sum of the arms' losses, so one optimiser step is exactly one step of
# every arm alone; the arms of a seed draw the same batches. Below, the first seed's six arms for 40 steps:
# the loss starts where $\tilde\epsilon = \epsilon_\theta/2$ puts it and falls as $G_\psi$ learns
# $\epsilon_\theta$ back. The dotted line is the frozen base's own loss.

# %%
walk = replace(cfg, seeds="0", steps=40, log_every=5)
out = Path(RUNS) / cfg.dataset / f"invdiff-walkthrough-{config_hash(walk)}"
stack = invdiff.train_arms(pipe, walk, arms, envs, z0, label, out)
print(f"{stack.num_arms} arms; a stacked tensor: {stack.names[0]} {tuple(stack.stacked[0].shape)}")
log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
with torch.no_grad():
    base_loss = ddpm.diffusion_loss(base, scheduler, z0, label, torch.Generator().manual_seed(2))
plt.figure(figsize=(5.5, 3.2))
for a, arm in enumerate(arms):
    plt.plot([row["step"] for row in log], [row["arm_loss"][a] for row in log], label=arm.name)
plt.axhline(base_loss, ls=":", c="k", label="frozen ε_θ")
plt.yscale("log"); plt.xlabel("step"); plt.ylabel("L (invariance objective)"); plt.legend(fontsize=7);

# %% [markdown]
# ## 7 · The whole experiment and its verdict
#
# `invdiff.run_experiment` does all of the above for every seed (here two): the environment table, each seed's
# environments at $K = 8$, every arm of every seed as one stacked model (12 arms), samples of each arm at
# $r = 0.5$ with classifier-free guidance ($s = 2$, $\tilde\epsilon$ in both passes) from the noise its seed
# shares with the base, and per arm and seed Bias, cond acc (the share of samples read as the requested digit)
# and FID-C. The report states its verdict rule before the tables, and the code writes the verdict. "Clearly
# below" is a paired difference across seeds, beyond the sampling resolution of $n$ samples an arm at $S$ seeds:
#
# $$\bar d < -2\,\max\!\Big(\mathrm{SE}_d,\ \sqrt{2/(n S)}\Big).$$

# %%
start = time.perf_counter()
summary = invdiff.run_experiment(cfg, pipe, RUNS, PRESET)                    # prints the table and the report
report_dir = Path(cfg.report)
print(f"\n{time.perf_counter() - start:.0f} s; report: {report_dir / 'report.md'}")

# %% [markdown]
# The resolution floor $\sqrt{2/(nS)}$ of this run, the verdict's checks as the code computed them, and the
# report's grid of the first seed's samples (shown as a JPEG to keep the notebook small):

# %%
(setting,) = summary["settings"]
n, S = base.num_classes * cfg.samples_per_class, setting["arms"]["base"]["Bias"]["n"]   # samples an arm, seeds
print(f"resolution floor √(2/(n·S)) = {(2 / (n * S)) ** 0.5:.3f} (n = {n} samples an arm, S = {S} seeds)")


def shown(value):                                # a check's value: a flag, a number or a paired difference
    if isinstance(value, dict):
        return f"d̄ {value['diff']:.3f} (SE_d {value['se']:.3f})"
    return str(value) if isinstance(value, bool) else f"{value:.3f}"


for name, check in setting["verdict"]["checks"].items():
    print(f"{name}: " + ", ".join(f"{k} {shown(v)}" for k, v in check.items()))
grid = read_image(str(report_dir / f"grids_r{setting['r']:g}_s{setting['scale']:g}.png"), ImageReadMode.RGB)
display(Image(data=encode_jpeg(grid, quality=85).numpy().tobytes(), format="jpeg", width=700))

# %% [markdown]
# ## 8 · What this run can and cannot show
#
# It shows the machinery, end to end and on the real code path: data whose color is tied to the digit, a frozen
# base, the three loss forms and how well each ranks the conflicting images, environments found without labels,
# the weights the objective then puts on the minority and where they turn negative as $\lambda$ grows, the
# zeroed copy that starts at $(1-r)\,\epsilon_\theta$, every arm trained as one stacked model, and a report whose
# verdict follows a rule fixed before the run.
#
# It cannot show whether InvDiff reduces the bias. The base model trained for seconds, so its losses, AUCs and
# environments describe this tiny model, not a converged one. Ten steps are too few for $G_\psi$ to learn
# $\epsilon_\theta$ back (compare the arms' cond acc and FID-C with the base's in the report). Four samples per
# digit give the resolution floor printed above, and with two seeds a 95% interval across seeds is the mean
# ± 12.7 standard errors ($t_{0.975}$ with one degree of freedom). A "does not reduce" here says that the run is
# too small to tell, nothing more. The answer needs the GPU runs of `python invdiff.py` (preset `small`: 1,000 steps per arm,
# three seeds, 50 samples per class and setting). Below, every InvDiff report committed under `results/`,
# each shown from its own files; [`results/REPORT.md`](../results/REPORT.md) describes what each one is.

# %%
for path in sorted(Path("results").glob("**/metrics.json")):
    m = json.loads(path.read_text())
    if "settings" in m:                          # written by the current invdiff.py: its report as written
        display(Markdown(f"### `{path.parent}` · {m['device']}\n\n" + (path.parent / "report.md").read_text()))
    elif m.get("method") == "invdiff":           # written by the earlier invdiff.py, in another configuration
        c = m["config"]
        shares = f"cells {c['cell_ratio']}" if c["cell_ratio"] else f"bias {c['bias']}"
        display(Markdown(f"### `{path.parent}` · {m['dataset']} · {m['device']} — the earlier configuration\n\n"
                         f"{shares}; K = {c['envs']} environments from ℓ "
                         f"`{c['env_loss']}`; G_ψ a fresh UNet at width {c['module_width']}; r = {c['guidance_weight']}; "
                         f"{c['steps']} steps per arm\n\n" + evaluate.format_table(m)))
