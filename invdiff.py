"""InvDiff (Hou et al. 2024, arXiv 2412.08480): invariant guidance on a frozen, biased diffusion model.

The base model ε_θ(z_t, t, c) is ddpm.py's class-conditional model (c = digit for cmnist, Smiling for
CelebA), trained on biased data and then frozen. The bias attribute (color / Male) is given to no
stage; only the diagnostic, the oracle arm and the evaluation read it.

1. Environments without annotations (the "max" step). A per-image loss of the frozen model,
       ℓ_i = (1/M) Σ_m  ‖ε̂_θ(z_{t_m}, t_m, c_i) − ε_{m,i}‖² / mean_j ‖ε̂_θ(…) − ε_{m,j}‖²      ("eps", default)
   over M fixed draws (t_m on the grid (m + ½)·T/M, ε_m seeded): each draw is divided by its mean over
   images, so ℓ_i ranks images, not timesteps (‖·‖² is the mean over latent elements). The authors
   ("authors": `--env-loss authors`) take one random t per image and, in their code, compare ε̂ with
   the clean latent z_0 rather than ε (almost certainly a slip), unnormalised. Then soft memberships
   W ∈ Δ^K (one row per image) maximise the spread of the environment risks:
       R_k = Σ_i w_ik ℓ_i / Σ_i w_ik,      max_W  std_k R_k
   by Adam (lr 0.01, 500 full-batch steps, W₀ ~ U(0,1)), projecting after each step: clamp at 0 and
   renormalise every row to sum 1. (The authors' scripts optionally add −w·min_ik w_ik ℓ_i; not used.)

2. Guidance module G_ψ(z_t, t, c): a fresh UNet at ¼ of the base width (6% of its parameters at the
   small and full presets, 11% at tiny; the authors copy the whole pretrained UNet instead), its last
   conv zero-initialised, combined with the frozen prediction as in the authors' code:
       ε̃ = r·G_ψ + (1 − r)·ε_θ      (r = 0.8, "convex")      or      ε̃ = ε_θ + r·G_ψ   ("additive")
   Only ψ is trained (θ: requires_grad False, eval mode).

3. Invariance objective (the "min" step), per batch, with the fixed rows of W:
       ℓ_i = ‖ε̃_i − ε_i‖²,   L = mean_k R_k + λ · Var_k R_k     (unbiased variance over environments
   that carry weight in the batch; λ = 1). With λ = 0 this is still the environment-balanced mean,
   so the λ = 0 arm isolates the variance term. Labels drop to ∅ with the base model's p_uncond.

4. Guided sampling: DDIM with ε̃ in both passes of classifier-free guidance,
       ε̃_cfg = ε̃(z_t, t, ∅) + s·(ε̃(z_t, t, c) − ε̃(z_t, t, ∅)),   s = 2
   (modest: enough for the requested class, while a large s sharpens each class toward its majority
   group, which is the bias we measure), with the same r as in training.

`python invdiff.py --dataset cmnist` reuses (or trains) the autoencoder and base model, infers the
environments and reports how they line up with the hidden groups, trains the arms (same steps and
seeds) base (r = 0, no training) · invdiff (λ = 1) · lambda0 (λ = 0) · random (W's rows shuffled over
images: same sizes and softness, no information) · oracle (W = one-hot true groups, the upper bound),
samples `samples_per_class` images per class from the same seeds, and writes runs/<dataset>/invdiff/
or --report (report.md, metrics.json, environments.md/json, samples_<arm>.png, samples.png).
"""
import json
import math
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.utils import save_image

import data
import ddpm
import evaluate
import vae as vae_lib
from train import (ConfigError, TrainConfig, check_train_config, config_hash, distributed, explicit_flags,
                   local_batch, main_guard, parse_config, runtime_flags, seed_everything, train)
from unet import UNet, count_parameters

ENV_LOSSES = ("eps", "authors")
FORMS = ("convex", "additive")
ARMS = ("base", "invdiff", "lambda0", "random", "oracle")
CELEBA_CELLS = "1,4,4,1"   # (smiling,male):(smiling,female):(not,male):(not,female): smiling ↔ female
MIN_WIDTH = 8              # G_ψ's narrowest level (GroupNorm and the time embedding need a few channels)


@dataclass
class InvDiffConfig(data.DataConfig, TrainConfig):
    envs: int = 2                  # K environments (the paper uses 8)
    env_draws: int = 8             # M fixed (t, ε) draws per image for ℓ_i ("eps" form)
    env_loss: str = "eps"          # eps | authors (see the module docstring)
    env_iters: int = 500           # Adam steps on W
    env_lr: float = 0.01
    module_width: float = 0.25     # G_ψ's channels relative to the base UNet's
    guidance_weight: float = 0.8   # r
    guidance_form: str = "convex"  # convex: r·G + (1−r)·ε_θ | additive: ε_θ + r·G
    lam: float = 1.0               # λ, weight of Var_k R_k
    arms: str = ",".join(ARMS)
    samples_per_class: int = 200   # evaluation samples per class and arm
    guidance_scale: float = 2.0    # CFG scale s (ε̃ in both passes)
    sample_steps: int = 50         # DDIM steps
    eval_epochs: int = 0           # evaluation classifiers' epochs (0 = evaluate.py's defaults)
    report: str = ""               # report folder (default runs/<dataset>/invdiff)
    train_only: bool = False       # train the arms, skip sampling and the report (one process per arm
                                   # with --arms NAME, then one run with every arm reuses them)


@dataclass
class ArmConfig(InvDiffConfig):
    """One trained arm: what its checkpoint and run-dir hash depend on."""
    arm: str = ""
    base: str = ""                 # the frozen base model's run dir name


PRESETS = {
    # tiny: fewer samples per class (20) and DDIM steps (10) so the whole run fits in minutes on a CPU
    "tiny": dict(steps=150, batch_size=32, lr=1e-3, warmup=20, ckpt_every=150, samples_per_class=20,
                 sample_steps=10, eval_epochs=1),
    # GPU: a step costs about the same up to batch 1024 (launch-bound, see bench.py), as for the base
    "small": dict(steps=3000, batch_size=1024, lr=4e-4, warmup=200, ckpt_every=1000),
    "full": dict(steps=10000, batch_size=1024, lr=2e-4, warmup=500, ckpt_every=2500),
}
SAMPLING_ONLY = ("arms", "samples_per_class", "guidance_scale", "sample_steps", "eval_epochs", "report",
                 "train_only")


def check(cfg: InvDiffConfig):
    if cfg.dataset == "mnist-pair":
        raise ConfigError("--dataset mnist-pair: its class is its group, so there is no hidden bias "
                          "attribute; choose cmnist or celeba")
    for name, value, allowed in (("env-loss", cfg.env_loss, ENV_LOSSES), ("guidance-form", cfg.guidance_form, FORMS)):
        if value not in allowed:
            raise ConfigError(f"--{name} {value!r}; choose {' or '.join(allowed)}")
    unknown = [a for a in cfg.arms.split(",") if a not in ARMS]
    if unknown or not cfg.arms:
        raise ConfigError(f"--arms {cfg.arms!r}: unknown {unknown}; choose from {','.join(ARMS)}")
    smallest_values = (("envs", cfg.envs, 1), ("env-draws", cfg.env_draws, 1), ("env-iters", cfg.env_iters, 0),
                       ("samples-per-class", cfg.samples_per_class, 2), ("sample-steps", cfg.sample_steps, 1),
                       ("lam", cfg.lam, 0), ("guidance-weight", cfg.guidance_weight, 0))
    for flag, value, smallest in smallest_values:
        if value < smallest:
            raise ConfigError(f"--{flag} {value} must be >= {smallest}")
    if not 0 < cfg.module_width <= 1:
        raise ConfigError(f"--module-width {cfg.module_width} must be in (0, 1]")


# ------------------------------------------------------------------ 1. environment inference (max)
@torch.inference_mode()
def per_sample_losses(base, scheduler, z0, label, *, draws=8, form="eps", generator=None, batch=1000):
    """ℓ_i [N] of the frozen model on latents z0 [N, c, h, w] with condition label [N]."""
    N, T, device = len(z0), scheduler.num_train_timesteps, z0.device
    if form not in ENV_LOSSES:
        raise ConfigError(f"--env-loss {form!r}; choose {' or '.join(ENV_LOSSES)}")

    def loss(t, noise, target):                      # t [N], noise / target [N, c, h, w] -> [N]
        out = []
        for s in range(0, N, batch):
            z_t = scheduler.add_noise(z0[s:s + batch], noise[s:s + batch], t[s:s + batch])
            with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
                pred = base(z_t, t[s:s + batch], label[s:s + batch]).float()
            eps_hat = scheduler.split_output(pred, t[s:s + batch], z_t)[1]     # ε̂ (also for v-prediction)
            out.append((eps_hat - target[s:s + batch]).square().mean((1, 2, 3)))
        return torch.cat(out)

    if form == "authors":                            # one random t per image, ε̂ compared with z_0
        t = torch.randint(0, T, (N,), generator=generator, device=device)
        return loss(t, torch.randn(z0.shape, generator=generator, device=device), z0)
    grid = ((torch.arange(draws) + 0.5) * T / draws).long()                   # [M]: 62, 187, …, 937
    per_draw = []
    for t in grid.tolist():
        noise = torch.randn(z0.shape, generator=generator, device=device)      # [N, c, h, w]
        l_m = loss(torch.full((N,), t, device=device), noise, noise)           # [N]
        per_draw.append(l_m / l_m.mean())                                      # each t weighs the same
    return torch.stack(per_draw).mean(0)                                       # [N]


def project_rows(W: torch.Tensor) -> torch.Tensor:
    """Onto the simplex the authors' way: clamp at 0, renormalise each row (an all-zero row -> uniform)."""
    W = W.clamp(min=0)
    s = W.sum(1, keepdim=True)
    return torch.where(s > 0, W / s.clamp_min(1e-30), 1 / W.shape[1])


def infer_environments(losses, K=2, iters=500, lr=0.01, generator=None) -> torch.Tensor:
    """W [N, K], rows on the simplex, maximising std_k R_k (R_k = Σ_i w_ik ℓ_i / Σ_i w_ik)."""
    losses = losses.float().clone()                                            # a normal tensor (not inference mode)
    W = torch.rand((len(losses), K), generator=generator, device=losses.device).requires_grad_()
    opt = torch.optim.Adam([W], lr=lr)
    for _ in range(iters):
        R = (W * losses[:, None]).sum(0) / W.sum(0).clamp_min(1e-12)         # [K]
        opt.zero_grad(set_to_none=True)
        (-R.std()).backward()                                                  # maximise the spread
        opt.step()
        with torch.no_grad():
            W.copy_(project_rows(W))
    return project_rows(W.detach())


def environment_table(W, group, losses) -> dict:
    """Diagnostic only (reads the hidden group): hard assignment argmax_k w_ik against the true groups."""
    env, group = W.argmax(1).cpu(), group.cpu()
    K, G = W.shape[1], int(group.max()) + 1
    confusion = torch.zeros(K, G, dtype=torch.long).index_put_((env, group), torch.tensor(1), accumulate=True)
    losses = losses.cpu().double()
    return {"confusion": confusion.tolist(),                                   # [K, G] image counts
            "purity": confusion.max(1).values.sum().item() / len(env),         # Σ_k max_g n_kg / N
            "majority_share": confusion.sum(0).max().item() / len(env),        # purity of one environment
            "soft_mass": (W.cpu().double().T @ F.one_hot(group, G).double()).tolist(),   # [K, G] Σ_i w_ik
            "R": ((W.cpu().double() * losses[:, None]).sum(0) / W.cpu().double().sum(0).clamp_min(1e-12)).tolist(),
            "loss_by_group": [losses[group == g].mean().item() for g in range(G)],
            "hardness": W.max(1).values.mean().item()}                         # mean max_k w_ik


def environment_markdown(table: dict, group_names) -> str:
    head = ["environment", "R_k", *[f"{n} (images)" for n in group_names], "majority share"]
    rows = [[str(k), f"{r:.3f}", *map(str, counts), f"{max(counts) / max(1, sum(counts)):.3f}"]
            for k, (r, counts) in enumerate(zip(table["R"], table["confusion"]))]
    lines = ["| " + " | ".join(row) + " |" for row in [head, ["---"] * len(head), *rows]]
    per_group = ", ".join(f"{n} {v:.3f}" for n, v in zip(group_names, table["loss_by_group"]))
    return "\n".join(["## Inferred environments (no annotations; groups read only for this table)", "",
                      *lines, "",
                      f"Purity Σ_k max_g n_kg / N = {table['purity']:.3f} (one environment would score "
                      f"{table['majority_share']:.3f}); mean max_k w_ik = {table['hardness']:.3f} "
                      f"(1 = hard assignment); mean ℓ_i per true group: {per_group}."]) + "\n"


# -------------------------------------------------------------------------- 2. guidance module G_ψ
def build_module(base_cfg: ddpm.DiffusionConfig, num_classes: int, width=0.25, latent_channels=4) -> UNet:
    """The base UNet's layout at `width` of its channels (≥ MIN_WIDTH); its last conv starts at zero."""
    channels = [max(MIN_WIDTH, round(int(c) * width)) for c in base_cfg.channels.split(",")]
    groups = math.gcd(base_cfg.norm_groups, *channels)
    return UNet(latent_channels, channels, base_cfg.num_res_blocks, num_classes, groups, base_cfg.dropout)


def guided_prediction(base, module, z_t, t, cond, *, r=0.8, form="convex"):
    """ε̃ = r·G_ψ + (1 − r)·ε_θ (convex) or ε_θ + r·G_ψ (additive); no gradient reaches ε_θ."""
    with torch.no_grad():
        eps_theta = base(z_t, t, cond)                                          # [B, c, h, w]
    g = module(z_t, t, cond)                                                    # [B, c, h, w]
    return r * g + (1 - r) * eps_theta if form == "convex" else eps_theta + r * g


# ------------------------------------------------------------------ 3. invariance objective (min)
def environment_risks(losses, W) -> torch.Tensor:
    """R_k = Σ_i w_ik ℓ_i / Σ_i w_ik: [K] (0 for an environment without weight in the batch)."""
    return (W * losses[:, None]).sum(0) / W.sum(0).clamp(min=1e-12)


def invariance_loss(losses, W, lam=1.0) -> torch.Tensor:
    """mean_k R_k + λ · Var_k R_k over the environments with weight in the batch (unbiased; 0 with a
    single one). losses [B], W [B, K]. Masks, not indexing, so a CUDA graph can capture it."""
    R = environment_risks(losses, W)                                            # [K]
    carry = (W.sum(0) > 0).to(R.dtype)                                          # [K] 1 = has weight
    n = carry.sum()
    mean = (R * carry).sum() / n
    variance = ((R - mean).square() * carry).sum() / (n - 1).clamp(min=1)
    return mean + lam * variance


def train_module(base, module, scheduler, z0, label, W, cfg: ArmConfig, out, *, p_uncond=0.1,
                 device="cpu", sample_fn=None) -> dict:
    """Train G_ψ only (train.py's loop: AdamW, EMA, checkpoints, resume) on the invariance objective."""
    base.eval().requires_grad_(False)
    rank, world = distributed()
    shard = torch.arange(rank, len(z0), world, device=device)                  # this rank's share
    K = base.num_classes

    def loss_fn(net, step, gen):
        idx = shard[torch.randint(len(shard), (local_batch(cfg.batch_size),), generator=gen, device=device)]
        z_t, t, noise = ddpm.noisy_batch(scheduler, z0[idx], gen)
        cond = ddpm.drop_labels(label[idx], K, p_uncond, gen)
        pred = guided_prediction(base, net, z_t, t, cond, r=cfg.guidance_weight, form=cfg.guidance_form)
        losses = (pred.float() - scheduler.target(z0[idx], noise, t)).square().mean((1, 2, 3))   # ℓ_i [B]
        return invariance_loss(losses, W[idx], cfg.lam)

    return train(module, loss_fn, cfg, out, params=list(module.parameters()), sample_fn=sample_fn,
                 device=device, desc=f"invdiff {cfg.arm}")


# ---------------------------------------------------------------------------- 4. guided sampling
def sample_classes(pipe, model, num_classes, n, *, seed=0, guidance_scale=2.0, steps=50) -> dict:
    """{class: uint8 [n, 3, H, W]} by DDIM with CFG; model(z, t, cond) -> ε̃, or None for the base."""
    cond = torch.arange(num_classes).repeat_interleave(n)                       # [K·n]
    images = pipe.sample(len(cond), cond, seed=seed, steps=steps, guidance_scale=guidance_scale,
                         model=model).cpu()
    return {c: images[cond == c] for c in range(num_classes)}


# -------------------------------------------------------------------------------- the experiment
def arm_config(cfg: InvDiffConfig, arm: str, base_name: str) -> ArmConfig:
    fields = {k: v for k, v in asdict(cfg).items() if k not in SAMPLING_ONLY}
    fields.update(arm=arm, base=base_name, lam=0.0 if arm == "lambda0" else cfg.lam)
    return ArmConfig(**fields)


def group_names(data_cfg: data.DataConfig) -> list:
    return {"cmnist": data_cfg.colors.split(","), "mnist-pair": data_cfg.digits.split(",")}.get(
        data_cfg.dataset, ["male", "female"])


def run_experiment(cfg: InvDiffConfig, pipe: ddpm.Pipeline, runs, preset, device, fresh=False) -> dict:
    check(cfg)
    rank, _ = distributed()
    start = time.perf_counter()
    latents = vae_lib.encode_dataset(pipe.vae, pipe.run_dir.parent / pipe.cfg.vae, pipe.data_cfg, device)
    z0, label, K = latents["z0"], latents["label"], latents["num_classes"]     # [N, c, h, w], [N]
    base = pipe.unet.eval().requires_grad_(False)
    scheduler = ddpm.build_scheduler(pipe.cfg, "ddpm")
    out = Path(cfg.report or Path(runs) / cfg.dataset / "invdiff")
    out.mkdir(parents=True, exist_ok=True)

    # 1. environments from the frozen model's losses (the group is read only for the table)
    gen = torch.Generator(device).manual_seed(cfg.seed)
    losses = per_sample_losses(base, scheduler, z0, label, draws=cfg.env_draws, form=cfg.env_loss, generator=gen)
    W = infer_environments(losses, cfg.envs, cfg.env_iters, cfg.env_lr, gen)   # [N, K]
    table = environment_table(W, latents["group"], losses)
    names = group_names(pipe.data_cfg)
    env_md = environment_markdown(table, names)
    if rank == 0:
        summary = {"env_loss": cfg.env_loss, "envs": cfg.envs, "env_draws": cfg.env_draws, **table}
        (out / "environments.json").write_text(json.dumps(summary, indent=2))
        (out / "environments.md").write_text(env_md)
        print(env_md)
    environments = {"invdiff": W, "lambda0": W,
                    "random": W[torch.randperm(len(W), generator=gen, device=W.device)],
                    "oracle": F.one_hot(latents["group"], len(names)).float()}

    # 2–4. one guidance module per arm, trained with the same steps and seeds, then sampled
    n_base = count_parameters(base)
    n_module = count_parameters(build_module(pipe.cfg, K, cfg.module_width, z0.shape[1]))
    if rank == 0:
        print(f"base ε_θ {n_base:,} parameters (frozen); G_ψ {n_module:,} ({n_module / n_base:.1%})")
    sampling = dict(seed=cfg.seed, guidance_scale=cfg.guidance_scale, steps=cfg.sample_steps)
    arms, arm_runs = [], {}
    for name in cfg.arms.split(","):
        fields = {"r": 0.0, "lambda": None, "environments": "none"}
        model = None
        if name != "base":
            acfg = arm_config(cfg, name, pipe.run_dir.name)
            run = Path(runs) / cfg.dataset / f"invdiff-{name}-{config_hash(acfg)}"
            if fresh:
                (run / "ckpt.pt").unlink(missing_ok=True)
            seed_everything(cfg.seed)                                          # same initial ψ in every arm
            module = build_module(pipe.cfg, K, cfg.module_width, z0.shape[1]).to(device)
            guide = partial(guided_prediction, base, r=cfg.guidance_weight, form=cfg.guidance_form)

            def grid(m, run_dir, guide=guide):                                # 8 per class, at checkpoints
                x = sample_classes(pipe, partial(guide, m), K, 8, **sampling)
                save_image(torch.cat(list(x.values())).float() / 255, run_dir / "samples.png", nrow=8)

            train_module(base, module, scheduler, z0, label, environments[name], acfg, run,
                         p_uncond=pipe.cfg.p_uncond, device=device, sample_fn=grid)
            model = partial(guide, module.eval())
            fields = {"r": cfg.guidance_weight, "lambda": acfg.lam, "environments": name if name in
                      ("random", "oracle") else "inferred"}
            arm_runs[name] = str(run)
        if rank == 0 and not cfg.train_only:
            arms.append({"name": name, **fields,
                         "class_images": sample_classes(pipe, model, K, cfg.samples_per_class, **sampling)})
    if rank != 0 or cfg.train_only:
        return {}

    evaluator = evaluate.get_evaluator(pipe.data_cfg, runs, device, epochs=cfg.eval_epochs or None)
    device_name = torch.cuda.get_device_name() if str(device).startswith("cuda") else "cpu"
    extra = {"config": asdict(cfg), "base_run": str(pipe.run_dir), "arm_runs": arm_runs,
             "parameters": {"base": n_base, "module": n_module}, "environments": table,
             "seconds": time.perf_counter() - start}
    metrics = evaluate.evaluate_arms(arms, evaluator, pipe.data_cfg, out, method="invdiff", preset=preset,
                                     device_name=device_name, extra=extra)
    settings = (f"Settings: K = {cfg.envs} environments from ℓ_i ({cfg.env_loss}, M = {cfg.env_draws}); "
                f"G_ψ {n_module:,} parameters vs ε_θ {n_base:,} ({n_module / n_base:.1%}); {cfg.guidance_form} "
                f"ε̃ with r = {cfg.guidance_weight}; λ = {cfg.lam}; {cfg.steps} steps per arm; "
                f"{cfg.samples_per_class} samples per class, DDIM-{cfg.sample_steps}, CFG s = {cfg.guidance_scale}.")
    with open(out / "report.md", "a") as f:
        f.write("\n" + settings + "\n\n" + env_md)
    return metrics


def main(argv=None):
    cfg, args = parse_config(InvDiffConfig, PRESETS, argv, description="InvDiff: invariant guidance, all arms")
    explicit = explicit_flags(InvDiffConfig, args)
    if cfg.dataset == "celeba" and "cell_ratio" not in explicit:      # condition Smiling, spuriously tied to Male
        cfg.cell_ratio = explicit["cell_ratio"] = CELEBA_CELLS
    check(cfg)
    check_train_config(cfg)                                           # before the autoencoder trains
    data_flags = {k: v for k, v in explicit.items() if k in data.DataConfig.__dataclass_fields__}
    base_cfg = ddpm.base_config(ddpm.data_config(cfg), args.preset, **data_flags, **runtime_flags(cfg))
    pipe = ddpm.ensure_base(base_cfg, args.preset, args.runs, args.device, args.fresh)
    run_experiment(cfg, pipe, args.runs, args.preset, args.device, args.fresh)


if __name__ == "__main__":
    main_guard(main)
