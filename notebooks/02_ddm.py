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
# # 2 · DDM: an indicator on the predicted noise
#
# A diffusion model trained on biased data reproduces the bias. DDM (the Debiasing Diffusion Model,
# arXiv 2503.12536) fine-tunes it with one extra term: an indicator $C$ reads the model's predicted noise
# $\hat\epsilon$ and is trained, together with the model, to recognise the sensitive group $y$. The group is
# used in training only; sampling is the plain sampler and never takes $y$.
#
# `python ddm.py --dataset cmnist` runs the authors' regime (protocol `prior`: a balanced prior, a short LoRA
# fine-tune on a small biased subset, five seeds, a verdict written by the code). This notebook steps through
# the same code on notebook 1's biased model (protocol `biased-base`, tiny preset, two seeds) so that it runs
# on a CPU in minutes: the inherited bias, the objective on one batch, a stacked sweep over $\alpha$ and
# seeds, intervals across seeds, the verdict rule, the trade-off and the samples; at the end it shows the
# full-scale GPU reports committed in `results/`.

# %%
import json
import sys
import time
from dataclasses import asdict
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
import ddm
import ddpm
import evaluate
import metrics
import torch.nn.functional as F
import vae
from stack import Stacked
# %matplotlib inline
import matplotlib.pyplot as plt   # after the imports: ddpm.py selects the file-only Agg backend for its CLI
from IPython.display import Image, Markdown, display

# %% [markdown]
# ## 1 · The base model inherits the data's bias
#
# The evaluation reads each generated image's group $y\in\{0, 1\}$ from its pixels (the nearest palette color
# of the foreground) and its digit from a small CNN trained on real MNIST. With $\hat p_k$ the share of
# samples in group $k$, fairness is the distance to the uniform share:
#
# $$\hat p_k = \frac{n_k}{\sum_j n_j},\qquad \mathrm{FD} = \tfrac12\sum_k\big|\hat p_k - \tfrac1K\big| = |\hat p_0 - 0.5|\;(K = 2).$$
#
# The base model of notebook 1 (reused here, or trained if missing) saw 80% red digits:

# %%
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

# %% [markdown]
# ## 2 · The indicator and the objective
#
# The indicator is the authors' MLP on the flattened predicted noise (no $t$ input):
#
# $$C:\ \hat\epsilon\in\mathbb R^{4\cdot 8\cdot 8}\ \to\ 1024\ \to\ 512\ \to\ K\ \text{logits},$$
#
# and the fine-tuning loss, with the model's prediction $\hat\epsilon = \epsilon_\theta(z_t, t, c)$, is
#
# $$\mathcal L = (1-\alpha)\,\|\hat\epsilon - \epsilon\|^2 + \alpha\,\mathrm{CE}\big(C(\hat\epsilon),\, y\big).$$
#
# Both $\epsilon_\theta$ and $C$ minimise the CE (one AdamW over both). $\alpha = 0$ is the plain fine-tune.
# The ablation beyond the paper reverses the gradient that flows from $C$ into $\epsilon_\theta$
# (`grad_sign = -1`): $C$ still learns to read the group, the denoiser learns to hide it.

# %%
latents = vae.encode_dataset(pipe.vae, pipe.run_dir.parent / pipe.cfg.vae, pipe.data_cfg, DEVICE)
z0, y = latents["z0"], latents["group"]                 # [2000, 4, 8, 8], [2000]
cfg = ddm.DDMConfig(**{**asdict(data_cfg), **ddm.PRESETS["biased-base"][PRESET], "protocol": "biased-base",
                       "alphas": "0,0.5", "adversarial": "0.5", "seeds": "0,1", "n_samples": 100})
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

# %% [markdown]
# ## 3 · A stacked sweep over α and seeds
#
# `ddm.run_sweep` builds every arm of a scenario (each $\alpha$, the adversarial ablation, each seed) and
# trains them as **one** model: `stack.Stacked` gives every trainable tensor a leading arm axis and runs the
# arms with `torch.func.vmap`, so one optimiser step is exactly one step of every arm alone (the loss is the
# sum of the arms' losses, AdamW and the EMA act element by element, clipping is per arm). Sampling runs all
# arms in one batched loop, each arm with its own seeded noise; arms of one seed share their noise, so
# differences between arms are paired. Two scenarios:
#
# * **FD** — the arm fine-tunes the $\varnothing$ model and is scored by FD of its unconditional samples.
# * **SPD** — the group is given as a condition (one new class row per group, label dropout 10%), sampled
#   per group with CFG, and scored by $\mathrm{SPD} = |P(\text{success}\mid a) - P(\text{success}\mid b)|$.

# %%
arms = ddm.sweep_arms(cfg, "fd")
print(len(arms), "FD arms:", ", ".join(a.name for a in arms))
stack = Stacked([ddm.arm_model(pipe, cfg, "fd", 2, a.seed) for a in arms])
print("a stacked tensor:", stack.names[0], tuple(stack.stacked[0].shape), "(arm axis first)")

start = time.perf_counter()
summary = ddm.run_sweep(cfg, PRESET, RUNS, DEVICE, evaluator=evaluator)    # prints the report's tables
report_dir = ddm.report_dir(cfg, RUNS)                                     # runs/cmnist/ddm-biased-base-<config hash>
print(f"done in {time.perf_counter() - start:.0f} s; report: {report_dir / 'report.md'}")

# %% [markdown]
# ## 4 · Intervals across seeds, and the verdict
#
# Each cell of the report is the mean over seeds with a 95% $t$-interval, $\bar x \pm t_{0.975,S-1}\,
# \mathrm{sd}/\sqrt S$ (`metrics.seed_summary`); the bootstrap over samples (`metrics.bootstrap`) is kept
# per seed in `metrics.json`. The verdict compares arms through their paired differences across seeds and
# is written by `metrics.ddm_verdict`, with its rule fixed before any run:

# %%
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

# %% [markdown]
# The authors' diagnostic, the entropy of the indicator on the arm's own samples (noised at a random $t$),
# and its accuracy on real held-out latents per $t$-bin: at $\alpha = 0$ the indicator gets no gradient and
# stays near chance ($\ln 2 \approx 0.693$); a low entropy means $\hat\epsilon$ carries the group.

# %%
for scenario, res in summary["scenarios"].items():
    for r in res["rows"]:
        acc = ", ".join(f"{k[6:]}: {r[k]['mean']:.2f}" for k in r if k.startswith("C_acc_t"))
        print(f"{scenario} {r['kind']:11s} α={r['alpha']:<4g} C entropy {r['C_entropy']['mean']:.3f}; C acc {acc}")

# %% [markdown]
# ## 5 · The trade-off: fairness vs image quality
#
# Quality is FID on the evaluation CNN's penultimate features ("FID-C"; for colored MNIST with the
# foreground's mean color appended), the real test images reweighted to the arm's own group share:
#
# $$\text{FID-C} = \|\mu_1-\mu_2\|^2 + \operatorname{tr}\!\big(S_1 + S_2 - 2\,(S_1^{1/2} S_2 S_1^{1/2})^{1/2}\big).$$
#
# It is not Inception-FID. One panel per scenario: the $\alpha$ points joined in order, the adversarial
# ablation dashed, the plain $\alpha = 0$ arm as a dotted reference line.

# %%
display(Image(filename=str(report_dir / "tradeoff.png"), width=700))

# %% [markdown]
# ## 6 · Samples of every arm
#
# `grids/` in the report folder: 64 samples per arm of the first seed (SPD arms: the two conditions mixed).
# Look at them: a metric can be fooled (collapsed samples can read as balanced).

# %%
paths = sorted((report_dir / "grids").glob("fd_*.png"))
fig, axes = plt.subplots(1, len(paths), figsize=(3 * len(paths), 3.3))
for ax, path in zip(axes, paths):
    ax.imshow(plt.imread(path))
    ax.set_title(path.stem.replace("fd__", "").replace("_", " "), fontsize=8)
    ax.axis("off")

# %% [markdown]
# ## 7 · Full-scale results (committed GPU runs)
#
# The tiny numbers above come from a model trained for seconds: they show the machinery, not the effect.
# The runs of `python ddm.py --dataset ...` on a GPU are committed under `results/`; this cell reads the
# verdicts from their `metrics.json` (protocol `prior`: the authors' regime), then the earlier reports.

# %%
for path in sorted(Path("results").glob("**/metrics.json")):
    m = json.loads(path.read_text())
    if "protocol" not in m:
        continue
    print(f"{path.parent} · {m['dataset']} · protocol {m['protocol']} · {m['device']}")
    for scenario, res in m["scenarios"].items():
        for v in res["verdicts"]:
            print(f"   {scenario.upper()} train {v['ratio'] or 'data'} CFG {v['scale']:g} {v['kind']}: "
                  f"{'lowers' if v['lowers'] else 'does not lower'}")

# %% [markdown]
# The earlier single-seed reports (protocol `biased-base`, one H100), each shown from its own `metrics.json`:

# %%
# Every metrics.json under results/ written by ddm.py, shown from the file itself (nothing re-typed).
committed = [(p, json.loads(p.read_text())) for p in sorted(Path("results").glob("**/metrics.json"))]
committed = [(p, m) for p, m in committed if m.get("method") == "ddm"]
if not committed:
    print("no committed GPU results yet (no results/**/metrics.json with method 'ddm')")
for path, m in committed:
    ref = m["reference"]
    shares = ", ".join(f"{n} {v:.3f}" for n, v in zip(ref["group_names"], ref["train_p_hat"]))
    display(Markdown(f"### {m['dataset']} · preset `{m['preset']}` · {m['device']} — `{path}`\n\n"
                     + evaluate.format_table(m)
                     + f"\n\nTraining share: {shares} (FD_half_l1 {ref['train_FD_half_l1']:.3f}); "
                     f"FID-C floor (real vs real) {ref['FID_C_floor']:.2f}; classifiers: {m['classifiers']}"))
    if (path.parent / "tradeoff.png").exists():
        display(Image(filename=str(path.parent / "tradeoff.png"), width=420))
