"""InvDiff (Hou et al. 2024, arXiv 2412.08480): invariant guidance on a frozen, biased diffusion model.

The base model ε_θ(z_t, t, c) is ddpm.py's class-conditional model, trained on data where the bias
attribute y is spuriously tied to the condition c (cmnist `--spurious 0.9`: digit d in its majority
color with probability ρ; CelebA: Smiling × Male cells 1:2:2:1), then frozen. y is given to no stage;
only the environment table, the oracle arms and the evaluation read it. Defaults follow the authors'
published scripts; where they differ from the paper or are ambiguous, the choice is named.

1. Environments without annotations (the "max" step, environments.py): soft memberships W ∈ Δ^K that
   maximise the spread std_k R_k of the frozen model's per-image losses over environments.

2. Guidance module G_ψ(z_t, t, c): a copy of the frozen base with its output conv zeroed (the authors';
   `--module small`: a fresh UNet at `--module-width` of the base's channels). Mixed with ε_θ as
       ε̃ = r·G_ψ + (1 − r)·ε_θ   (convex, default)      or      ε̃ = ε_θ + r·G_ψ   (additive)
   trained at r = 0.5 and sampled at r ∈ {0.5, 0.8}: the authors' training script never passes its
   ratio on, so its wrapper's 0.5 applies there, while their sampling script passes 0.8. If training
   reaches 0.5·G + 0.5·ε_θ = ε*, sampling at 0.8 gives ε_θ + 1.6·(ε* − ε_θ): the correction extrapolated.
   The zeroed copy starts at ε̃ = ε_θ / 2, so every trained arm, ERM included, first has to learn ε_θ
   back. Training follows the authors' optimiser: AdamW lr 1e-4, weight decay 1e-2, batch 64, cosine
   schedule after a warm-up of a tenth of the steps, clipping at norm 1, no EMA, no label dropout (∅ is
   never trained: the CFG pass at ∅ uses G_ψ's copy of the base's ∅ row); their 10,000 steps on Stable
   Diffusion become 1,000 (`small`) or 4,000 (`full`) here.

3. Invariance objective (the "min" step) on the biased training data, with fixed rows of W:
       ℓ_i = ‖ε̃_i − ε_i‖²,   L = mean_k R_k + λ · Var_k R_k      (unbiased variance over the environments
   with weight in the batch, as the authors' code). Its weight on image i is
       ∂L/∂ℓ_i = Σ_k (w_ik / S_k) · (1/K + 2λ (R_k − R̄) / (K − 1)),    S_k = Σ_i w_ik,
   so with equal-size environments and λ = 0 every image weighs 1/N: plain ERM. λ alone tilts the
   weights, and at large λ some turn negative (invdiff_report.effective_weights shows where, for the
   whole training set; a batch of 64 estimates each R_k from a few images, so its tilt is noisier).

4. Arms, all trained as one stacked model (stack.py) from the same batches per seed: base (frozen, no
   module) · erm (one environment: uniform weights) · inferred at λ ∈ {0, 1, 10, 100} · random (W's rows
   shuffled among the images of each class: the same sizes and class mix, no other information; λ = 1)
   · oracle (one-hot true cells c × y, the upper bound; λ = 0, which is cell-balanced ERM with the
   labels, and λ = 1). Seeds are an axis: each seed infers its own environments, draws its own batches
   and sampling noise, shared by its arms (and by the base at that seed); so in training the frozen
   ε_θ is computed once per seed for all of that seed's arms.

5. Guided sampling: DDIM with ε̃ in both passes of classifier-free guidance at s ∈ {2, 7.5},
       ε̃_cfg = ε̃(z_t, t, ∅) + s · (ε̃(z_t, t, c) − ε̃(z_t, t, ∅)).

`python invdiff.py --dataset cmnist` reuses (or trains) the autoencoder and base model, writes the
environment table (`--stage environments` stops there), trains every arm, samples them and writes
report.md with the verdict rule before its tables (invdiff_report.py) to runs/<dataset>/invdiff-<config>.
"""
import copy
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn

import data
import ddpm
import evaluate
import invdiff_report
import vae as vae_lib
from ddm import parse_list
from environments import ENV_LOSSES, infer_environments, per_sample_losses
from stack import Stacked, arm_batch
from config import (ConfigError, TrainConfig, check_train_config, config_hash, device_name, explicit_flags,
                    main_guard, parse_config, runtime_flags)
from train import train
from unet import UNet

MODULES = ("copy", "small")
FORMS = ("convex", "additive")
KINDS = ("base", "erm", "inferred", "random", "oracle")
STAGES = ("all", "environments")
SPURIOUS = 0.9             # cmnist: P(digit d has its majority color), unless --spurious is given
CELEBA_CELLS = "1,2,2,1"   # (smiling,male):(smiling,female):(not,male):(not,female), the authors' cells
MIN_WIDTH = 8              # a small G_ψ's narrowest level (GroupNorm and the time embedding need a few)
SAMPLE_SEED = 10 ** 6      # sampling noise of seed s: SAMPLE_SEED + s (training draws from s·1000)


@dataclass
class InvDiffConfig(data.DataConfig, TrainConfig):
    stage: str = "all"               # all | environments (the environment table only)
    envs: int = 8                    # K environments (the authors' final runs)
    env_loss: str = "authors"        # authors | eps-grid | eps-window (see 1.)
    env_draws: int = 8               # M draws of (t, ε) per image (eps-grid, eps-window)
    env_window: str = "0,250"        # eps-window's t range lo,hi
    env_beta: float = 3.0            # β of the min term (the authors' loss_not_zero_weight)
    env_iters: int = 500             # Adam steps on W
    env_lr: float = 0.01
    table_losses: str = ",".join((*ENV_LOSSES, "z0-norm"))   # the environment table compares these …
    table_envs: str = "2,4,8"        # … at these K
    module: str = "copy"             # copy | small (see 2.)
    module_width: float = 0.25       # small's channels relative to the base's
    guidance_form: str = "convex"    # convex: r·G + (1−r)·ε_θ | additive: ε_θ + r·G
    train_ratio: float = 0.5         # r in training
    sample_ratios: str = "0.5,0.8"   # r at sampling
    lams: str = "0,1,10,100"         # λ of the inferred arms
    lam: float = 1.0                 # λ of the random arm (and the oracle arm beside λ = 0)
    kinds: str = ",".join(KINDS)     # which arms
    seeds: str = "0,1,2"
    samples_per_class: int = 50      # evaluation samples per class, arm, seed and setting
    guidance_scales: str = "2,7.5"
    sample_steps: int = 50           # DDIM steps
    eval_epochs: int = 0             # evaluation classifiers' epochs (0 = evaluate.py's defaults)
    report: str = ""                 # report folder (default runs/<dataset>/invdiff-<config>)
    train_only: bool = False         # train the arms, skip sampling and the report
    # the authors' optimiser for G_ψ (see 2.); the tiny preset overrides lr and batch size
    lr: float = 1e-4
    batch_size: int = 64
    weight_decay: float = 1e-2
    lr_schedule: str = "cosine"
    ema_decay: float = 0.0           # no EMA
    p_uncond: float = 0.0            # label dropout while G_ψ trains (the authors': none)


PRESETS = {
    # tiny: two seeds, λ ∈ {0, 1}, few samples, DDIM-10: the whole run takes minutes on a CPU
    "tiny": dict(steps=150, batch_size=32, lr=1e-3, warmup=20, ckpt_every=150, seeds="0,1", lams="0,1",
                 env_iters=100, samples_per_class=10, guidance_scales="2", sample_steps=10, eval_epochs=1),
    # GPU: 24 stacked arms (8 per seed) of batch 64 per step; the optimiser is the dataclass default
    "small": dict(steps=1000, warmup=100, ckpt_every=500),
    "full": dict(steps=4000, warmup=400, ckpt_every=1000, samples_per_class=100),
}
SAMPLING_ONLY = ("stage", "table_losses", "table_envs", "sample_ratios", "samples_per_class", "guidance_scales",
                 "sample_steps", "eval_epochs", "report", "train_only")


@dataclass(frozen=True)
class Arm:
    kind: str          # erm | inferred | random | oracle (base is not trained)
    lam: float
    seed: int

    @property
    def name(self) -> str:
        return self.kind if self.kind == "erm" else f"{self.kind} λ={self.lam:g}"


def check(cfg: InvDiffConfig):
    """Every flag, before anything trains."""
    if cfg.dataset == "mnist-pair":
        raise ConfigError("--dataset mnist-pair: its class is its group, so there is no hidden bias "
                          "attribute; choose cmnist or celeba")
    for flag, allowed in (("stage", STAGES), ("env_loss", ENV_LOSSES), ("module", MODULES), ("guidance_form", FORMS)):
        if getattr(cfg, flag) not in allowed:
            raise ConfigError(f"--{flag.replace('_', '-')} {getattr(cfg, flag)!r}; choose {' or '.join(allowed)}")
    unknown = [k for k in cfg.kinds.split(",") if k not in KINDS]
    if unknown or not cfg.kinds:
        raise ConfigError(f"--kinds {cfg.kinds!r}: unknown {unknown}; choose from {','.join(KINDS)}")
    if not set(cfg.table_losses.split(",")) <= {*ENV_LOSSES, "z0-norm"}:
        raise ConfigError(f"--table-losses {cfg.table_losses!r}: choose from {','.join(ENV_LOSSES)},z0-norm")
    lo_hi = parse_list(cfg, "env_window", int)
    if len(lo_hi) != 2 or not 0 <= lo_hi[0] < min(lo_hi[1], 1000):
        raise ConfigError(f"--env-window {cfg.env_window!r}: two timesteps lo,hi with 0 <= lo < hi and lo < 1000, e.g. 0,250")
    if "base" not in cfg.kinds.split(","):
        raise ConfigError(f"--kinds {cfg.kinds!r}: include base, the arm every verdict is read against")
    for flag, smallest in (("seeds", 0), ("table_envs", 1)):
        if not parse_list(cfg, flag, int) or min(parse_list(cfg, flag, int)) < smallest:
            raise ConfigError(f"--{flag.replace('_', '-')} {getattr(cfg, flag)!r}: integers >= {smallest}")
    for flag in ("lams", "sample_ratios", "guidance_scales"):
        if not parse_list(cfg, flag) or min(parse_list(cfg, flag)) < 0:
            raise ConfigError(f"--{flag.replace('_', '-')} {getattr(cfg, flag)!r}: numbers >= 0")
    for flag, value, smallest in (("envs", cfg.envs, 1), ("env-draws", cfg.env_draws, 1),
                                  ("env-iters", cfg.env_iters, 0), ("env-beta", cfg.env_beta, 0),
                                  ("samples-per-class", cfg.samples_per_class, 2),
                                  ("sample-steps", cfg.sample_steps, 1), ("lam", cfg.lam, 0),
                                  ("train-ratio", cfg.train_ratio, 0), ("p-uncond", cfg.p_uncond, 0)):
        if value < smallest:
            raise ConfigError(f"--{flag} {value} must be >= {smallest}")
    if not 0 < cfg.module_width <= 1:
        raise ConfigError(f"--module-width {cfg.module_width} must be in (0, 1]")
    if "inferred" in cfg.kinds and cfg.lam not in parse_list(cfg, "lams"):
        raise ConfigError(f"--lam {cfg.lam:g} must be one of --lams {cfg.lams}: the verdict reads the inferred "
                          "arm at --lam beside the random and oracle arms")
    check_train_config(cfg)


# -------------------------------------------------------------------------- 2. guidance module G_ψ
def build_module(base: UNet, base_cfg: ddpm.DiffusionConfig, kind="copy", width=0.25) -> UNet:
    """G_ψ: a copy of the base with its output conv zeroed, or a fresh UNet of the base's layout at
    `width` of its channels (≥ MIN_WIDTH; its output conv starts at zero, as every fresh UNet's)."""
    if kind == "copy":
        module = copy.deepcopy(base).requires_grad_(True).train()
        nn.init.zeros_(module.out[-1].weight)
        nn.init.zeros_(module.out[-1].bias)
        return module
    channels = [max(MIN_WIDTH, round(int(c) * width)) for c in base_cfg.channels.split(",")]
    groups = math.gcd(base_cfg.norm_groups, *channels)
    return UNet(base.conv_in.in_channels, channels, base_cfg.num_res_blocks, base.num_classes, groups,
                base_cfg.dropout).to(base.conv_in.weight.device)


class Guided(nn.Module):
    """ε̃(z_t, t, c; r) from the frozen base and G_ψ (see 2.); only G_ψ's tensors train."""

    def __init__(self, base: UNet, module: UNet, form="convex"):
        super().__init__()
        self.base, self.module, self.form = base.requires_grad_(False).eval(), module, form

    def forward(self, z_t, t, cond, r, eps_theta=None):                         # eps_theta: if known
        eps_theta = self.base(z_t, t, cond) if eps_theta is None else eps_theta  # [B, c, h, w], no gradient
        g = self.module(z_t, t, cond)                                           # [B, c, h, w]
        return r * g + (1 - r) * eps_theta if self.form == "convex" else eps_theta + r * g


# ------------------------------------------------------------------ 3. invariance objective (min)
def environment_risks(losses, W) -> torch.Tensor:
    """R_k = Σ_i w_ik ℓ_i / Σ_i w_ik: losses [..., B], W [..., B, K] -> [..., K] (0 without weight)."""
    return (W * losses[..., None]).sum(-2) / W.sum(-2).clamp(min=1e-12)


def invariance_loss(losses, W, lam=1.0) -> torch.Tensor:
    """mean_k R_k + λ · Var_k R_k over the environments with weight in the batch (unbiased; 0 with a
    single one): losses [..., B], W [..., B, K], λ a number or [...] -> [...]. Masks, not indexing,
    so a CUDA graph can capture it."""
    R = environment_risks(losses, W)                                            # [..., K]
    has_weight = (W.sum(-2) > 0).to(R.dtype)                                    # [..., K]
    n = has_weight.sum(-1)
    mean = (R * has_weight).sum(-1) / n
    variance = ((R - mean[..., None]).square() * has_weight).sum(-1) / (n - 1).clamp(min=1)
    return mean + lam * variance


def oracle_cells(label, group, num_groups: int) -> torch.Tensor:
    """One-hot true cells c × y: [N, C·G] (four for CelebA's Smiling × Male, twenty for cmnist)."""
    return nn.functional.one_hot(label * num_groups + group, int(label.max() + 1) * num_groups).float()


def sweep_arms(cfg: InvDiffConfig) -> list:
    kinds, arms = cfg.kinds.split(","), []
    for seed in parse_list(cfg, "seeds", int):
        arms += [Arm("erm", 0.0, seed)] if "erm" in kinds else []
        arms += [Arm("inferred", lam, seed) for lam in parse_list(cfg, "lams")] if "inferred" in kinds else []
        arms += [Arm("random", cfg.lam, seed)] if "random" in kinds else []
        arms += [Arm("oracle", lam, seed) for lam in sorted({0.0, cfg.lam})] if "oracle" in kinds else []
    return arms


def shuffle_within(label, generator) -> torch.Tensor:
    """A permutation of the N images that maps each image to one of its own class: [N]."""
    order = torch.empty_like(label)
    for c in label.unique():
        members = (label == c).nonzero().squeeze(1)
        order[members] = members[torch.randperm(len(members), generator=generator).to(label.device)]
    return order


def arm_environments(arms, inferred: dict, cells, label) -> list:
    """W of every arm, [N, K_max] (zero columns pad the arms with fewer environments); one tensor per
    distinct W, shared by the arms that use it. inferred: seed -> W; the random arm's rows are
    shuffled within each class (label [N])."""
    K_max = max([cells.shape[1], *(W.shape[1] for W in inferred.values())])

    def pad(W):
        return nn.functional.pad(W, (0, K_max - W.shape[1]))

    shared = {("oracle", None): pad(cells), ("erm", None): pad(torch.ones_like(cells[:, :1]))}
    for seed, W in inferred.items():
        shuffle = shuffle_within(label, torch.Generator().manual_seed(seed))
        shared["inferred", seed], shared["random", seed] = pad(W), pad(W[shuffle])
    return [shared[arm.kind, None if arm.kind in ("erm", "oracle") else arm.seed] for arm in arms]


def train_arms(pipe, cfg: InvDiffConfig, arms, envs, z0, label, out) -> Stacked:
    """Every arm's G_ψ as one stacked model. Arms of one seed draw the same batches (train.train), so
    the frozen ε_θ is computed once per seed and shared by that seed's arms."""
    base, scheduler, device = pipe.unet, ddpm.build_scheduler(pipe.cfg, "ddpm"), pipe.device
    module = build_module(base, pipe.cfg, cfg.module, cfg.module_width)
    stack = Stacked([Guided(base, module, cfg.guidance_form)] * len(arms))
    lam = torch.tensor([arm.lam for arm in arms], device=device)                             # [A]
    r = torch.full((len(arms),), cfg.train_ratio, device=device)                             # [A]
    seeds = list(dict.fromkeys(arm.seed for arm in arms))                                    # S distinct
    first = torch.tensor([[arm.seed for arm in arms].index(s) for s in seeds], device=device)  # an arm per seed
    row = torch.tensor([seeds.index(arm.seed) for arm in arms], device=device)              # arm -> its seed

    def shared_eps_theta(z_t, t, cond):                  # [A, B, c, h, w] from S·B base predictions
        with torch.no_grad(), torch.autocast("cuda", enabled=False):                        # as in the stack
            eps = base(z_t[first].flatten(0, 1).to(base.conv_in.weight.dtype), t[first].flatten(0, 1),
                       cond[first].flatten(0, 1))
        return eps.unflatten(0, (len(seeds), -1))[row]

    def draw(W, gen):                                    # one arm's batch, as a lone run would draw it
        idx = torch.randint(len(z0), (cfg.batch_size,), generator=gen, device=device)
        z_t, t, noise = ddpm.noisy_batch(scheduler, z0[idx], gen)
        cond = ddpm.drop_labels(label[idx], base.num_classes, cfg.p_uncond, gen)
        return z_t, t, cond, scheduler.target(z0[idx], noise, t), W[idx]

    def loss_fn(net, step, gens):
        z_t, t, cond, target, W = (torch.stack(x) for x in zip(*(draw(W, g) for W, g in zip(envs, gens))))
        losses = (net(z_t, t, cond, r, shared_eps_theta(z_t, t, cond)) - target).square().mean((2, 3, 4))  # ℓ [A, B]
        return invariance_loss(losses, W, lam)                                               # [A]

    stats = train(stack, loss_fn, cfg, out, device=device, desc=f"invdiff ({len(arms)} arms)",
                  arm_seeds=[arm.seed for arm in arms])
    if not math.isnan(stats["img_per_s"]):                                                   # NaN: reused
        print(f"{len(arms)} arms, {stats['step']} steps in {stats['seconds']:.0f}s "
              f"({stats['img_per_s']:.0f} img/s over all arms)")
    return stack.eval()


# ---------------------------------------------------------------------------- 5. guided sampling
def sample_stacked(pipe, stack, arms, cfg, r: float, scale: float) -> torch.Tensor:
    """uint8 [A, C·n, 3, H, W]: n per class of every arm at ratio r and CFG scale; arm a's noise from
    SAMPLE_SEED + seed_a, so the arms of a seed (and the base at that seed) share it."""
    C, n, A = pipe.unet.num_classes, cfg.samples_per_class, len(arms)
    cond = torch.arange(C, device=pipe.device).repeat_interleave(n).expand(A, -1)            # [A, C·n]
    ratio = torch.full((A,), r, device=pipe.device)
    z = pipe.sample_latents(C * n, cond, seed=[SAMPLE_SEED + arm.seed for arm in arms], steps=cfg.sample_steps,
                            guidance_scale=scale, model=lambda z, t, c: stack(z, t, c, ratio),
                            batch_size=arm_batch(A, 2 if scale != 1 else 1))
    return pipe.decode(z.flatten(0, 1)).cpu().unflatten(0, (A, C * n))


def sample_base(pipe, cfg, seed: int, scale: float) -> torch.Tensor:
    C, n = pipe.unet.num_classes, cfg.samples_per_class
    cond = torch.arange(C, device=pipe.device).repeat_interleave(n)                          # [C·n]
    return pipe.sample(C * n, cond, seed=SAMPLE_SEED + seed, steps=cfg.sample_steps, guidance_scale=scale,
                       autocast=False).cpu()                                     # float32, as the stacked arms


# -------------------------------------------------------------------------------- the experiment
def run_experiment(cfg: InvDiffConfig, pipe: ddpm.Pipeline, runs, preset, fresh=False) -> dict:
    check(cfg)
    start, device = time.perf_counter(), pipe.device
    latents = vae_lib.encode_dataset(pipe.vae, pipe.run_dir.parent / pipe.cfg.vae, pipe.data_cfg, device)
    z0, label, group = latents["z0"], latents["label"], latents["group"]         # [N, c, h, w], [N], [N]
    base, scheduler = pipe.unet.eval().requires_grad_(False), ddpm.build_scheduler(pipe.cfg, "ddpm")
    train_cfg = replace(cfg, **{k: getattr(InvDiffConfig, k) for k in SAMPLING_ONLY})
    name = f"invdiff-{config_hash(train_cfg)}-{pipe.run_dir.name}"
    out = Path(cfg.report or Path(runs) / cfg.dataset / name)
    out.mkdir(parents=True, exist_ok=True)
    window = tuple(parse_list(cfg, "env_window", int))

    def losses_of(form, seed, normalise=True):
        return per_sample_losses(base, scheduler, z0, label, form=form, draws=cfg.env_draws, window=window,
                                 generator=torch.Generator(device).manual_seed(seed), normalise=normalise)

    def environments(losses, K, seed):
        return infer_environments(losses, K, cfg.env_iters, cfg.env_lr, cfg.env_beta,
                                  torch.Generator(device).manual_seed(seed))

    # 1. the environment table (forms × K, first seed) and every seed's environments
    seeds, lams = parse_list(cfg, "seeds", int), sorted({0.0, cfg.lam, *parse_list(cfg, "lams")})
    # z0-norm scores an image by ‖z₀‖² alone, no model: what ‖ε̂ − z₀‖² ≈ 1 + ‖z₀‖² reads when ε̂ ≈ ε
    first = {form: z0.square().mean((1, 2, 3)) if form == "z0-norm" else losses_of(form, seeds[0])
             for form in cfg.table_losses.split(",")}
    candidates = {(form, K): (first[form], environments(first[form], K, seeds[0]))
                  for form in cfg.table_losses.split(",") for K in parse_list(cfg, "table_envs", int)}
    objective = losses_of("eps-grid", seeds[0], normalise=False)   # the objective's ℓ_i at ε̃ = ε_θ (see 3.)
    table = invdiff_report.environment_table(candidates, label, group, objective, lams)
    invdiff_report.write_environments(out, table)
    if cfg.stage == "environments":
        return {"environments": table}
    inferred, key = {}, (cfg.env_loss, cfg.envs)
    for seed in seeds:                                     # the first seed's W is in the table already
        inferred[seed] = (candidates[key][1] if seed == seeds[0] and key in candidates
                          else environments(losses_of(cfg.env_loss, seed), cfg.envs, seed))

    # 2–4. every arm as one stacked model
    arms = sweep_arms(cfg)
    envs = arm_environments(arms, inferred, oracle_cells(label, group, int(group.max()) + 1), label)
    run = Path(runs) / cfg.dataset / name
    if fresh:
        for old in (run / "ckpt.pt", run / "log.jsonl"):
            old.unlink(missing_ok=True)
    stack = train_arms(pipe, train_cfg, arms, envs, z0, label, run) if arms else None
    if cfg.train_only:
        return {}

    # 5. samples of every arm, seed, ratio and scale (uint8 [C·n, 3, H, W] each), then the report
    samples = []
    for scale in parse_list(cfg, "guidance_scales"):
        samples += [(dict(arm="base", seed=seed, r=0.0, scale=scale), sample_base(pipe, cfg, seed, scale))
                    for seed in seeds]
        for r in parse_list(cfg, "sample_ratios") if arms else []:
            images = sample_stacked(pipe, stack, arms, cfg, r, scale)                       # [A, C·n, 3, H, W]
            samples += [(dict(arm=arm.name, seed=arm.seed, r=r, scale=scale), x) for arm, x in zip(arms, images)]
    evaluator = evaluate.get_evaluator(pipe.data_cfg, runs, device, epochs=cfg.eval_epochs or None)
    extra = {"config": asdict(cfg), "base_run": str(pipe.run_dir), "arm_run": str(run), "preset": preset,
             "device": device_name(device), "classifiers": dict(evaluator.accuracies)}
    return invdiff_report.write_report(out, cfg, table, samples, evaluator, pipe.data_cfg, run / "log.jsonl",
                                       arms, {**extra, "seconds": time.perf_counter() - start})


def main(argv=None):
    cfg, args = parse_config(InvDiffConfig, PRESETS, argv, description="InvDiff: invariant guidance, all arms")
    explicit = explicit_flags(InvDiffConfig, args)
    if cfg.dataset == "celeba" and "cell_ratio" not in explicit:      # condition Smiling, spuriously tied to Male
        cfg.cell_ratio = explicit["cell_ratio"] = CELEBA_CELLS
    if cfg.dataset == "cmnist" and "spurious" not in explicit:        # color spuriously tied to the digit
        cfg.spurious = explicit["spurious"] = SPURIOUS
    check(cfg)                                                        # before the autoencoder trains
    torch.backends.cuda.matmul.allow_tf32 = True       # the stacked arms' float32 matmuls on tensor cores
    data_flags = {k: v for k, v in explicit.items() if k in data.DataConfig.__dataclass_fields__}
    base_cfg = ddpm.base_config(ddpm.data_config(cfg), args.preset, **data_flags, **runtime_flags(cfg))
    pipe = ddpm.ensure_base(base_cfg, args.preset, args.runs, args.device, args.fresh)
    run_experiment(cfg, pipe, args.runs, args.preset, args.fresh)


if __name__ == "__main__":
    main_guard(main)
