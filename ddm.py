"""DDM, the Debiasing Diffusion Model (arXiv 2503.12536): an indicator on the predicted noise.

An indicator C reads the denoiser's predicted noise ε̂ = ε_θ(z_t, t, c) (flattened; no t input),

    C:  ε̂ [B, c·h·w] -> Linear(d, 1024) -> ReLU -> Linear(1024, 512) -> ReLU -> Linear(512, K) logits

and the fine-tuning loss adds its cross-entropy on the sensitive group y, at the same t as the MSE:

    L = (1 − α) · ‖ε̂ − ε‖²  +  α · CE(C(ε̂), y)

Both ε_θ and C minimise the CE (cooperative, one AdamW over both), as in the authors' code; y is used
in training only. α = 0 is the plain fine-tune. Ablation beyond the paper (kind "adversarial"): the
gradient from C into ε_θ is reversed (C still minimises the CE, ε_θ maximises it), so ε̂ is pushed
to carry *less* group information: C reads  ε̂.detach() + s·(ε̂ − ε̂.detach()), s = −1 (s = +1: DDM).

Protocol `prior` (the default, the authors' regime). The authors fine-tune Stable Diffusion, a prior
trained elsewhere, on a small attribute-imbalanced set with one fixed prompt. Here:
* the prior is a class-conditional base trained on *balanced* data (cmnist and mnist-pair at 1:1,
  CelebA on a gender-balanced subset), with its null row ∅;
* each arm fine-tunes for `steps` (1,000) updates at a small batch (4: the authors' 1 × 4 accumulation)
  on a small subset (`n_finetune` images) at a train ratio group 0 : group 1 of 1:4, 4:1 or 1:1;
* a new "prompt" row of the class table (initialised from ∅, no label dropout) is the fixed prompt:
  every fine-tuning sample is conditioned on it (SPD: one new row per group), and it trains with the
  rest, standing in for the prompt's embedding (so that CFG against ∅ means something). The class
  table is one tensor, so AdamW's weight decay also shrinks ∅ and the base rows, by lr·wd = 1e-7 of
  their size per step at the authors' settings;
* LoRA r = 8 with scale lora_alpha / r = 32 / 8 on the q and v projections of every attention layer,
  AdamW lr 1e-5, weight decay 1e-2, gradients clipped by value at 1, no EMA (the authors' settings);
* samples are drawn with the prompt row under classifier-free guidance against ∅ at each of
  `guidance_scales` (1 and 7.5, SD's default), 40 DDIM steps, n_samples (1,000) per arm.
Same-label baseline: kind "rebalanced" is the α = 0 fine-tune on the subset resampled to 1:1 with the
labels DDM is given (the minority drawn with replacement).
Protocol `biased-base`: the base is trained on the biased data itself and every arm fine-tunes it on
that same data (500 steps at batch 1024, full fine-tune, EMA); FD arms fine-tune ∅ and sample
unconditionally, SPD arms append one row per group (label dropout to ∅, CFG 2).

Scenarios: FD — the prompt's samples are scored by their groups' balance, FD = |p̂ − ½|;
SPD — the group is the condition, SPD = |P(shows a | cond a) − P(shows b | cond b)|.
Seeds are an axis: every arm runs at each seed (fine-tune seed and sampling noise), arms of one seed
share their sampling noise (paired), and all arms of a scenario train and sample as one stacked model
(stack.py), exactly as each would alone in float32. The report (ddm_report.py) applies the verdict
rule of metrics.py, written before any number came in.
"""
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import ddm_report
import ddpm
import evaluate
import vae as vae_lib
from stack import Stacked
from config import (ConfigError, TrainConfig, check_train_config, config_hash, explicit_flags, main_guard,
                    parse_config, runtime_flags)
from train import train
from unet import Attention

PROTOCOLS = ("prior", "biased-base")
SCENARIOS = ("fd", "spd")


@dataclass
class DDMConfig(data.DataConfig, TrainConfig):
    protocol: str = "prior"                    # prior | biased-base (see the docstring)
    alphas: str = "0,0.01,0.05,0.2,0.5"        # the α sweep of the cooperative indicator (DDM)
    adversarial: str = "0.05,0.5"              # α of the gradient-reversal ablation ('' = none)
    scenarios: str = "fd,spd"
    seeds: str = "0,1,2,3,4"                   # every arm at every seed
    train_ratios: str = "1:4,4:1,1:1"          # prior: group 0 : group 1 of the fine-tuning subset
    n_finetune: int = 4000                     # prior: images in each fine-tuning subset
    finetune: str = "lora"                     # lora | full
    lora_rank: int = 8
    lora_alpha: float = 32.0                   # LoRA scale = lora_alpha / lora_rank
    ce_max_t: int = -1                         # CE only where t < ce_max_t (-1: every t)
    n_samples: int = 1000                      # samples per arm and CFG scale (SPD: per group)
    guidance_scales: str = "1,7.5"             # CFG scales of the samples (biased-base FD: always 1)
    sample_steps: int = 40                     # DDIM steps
    report: str = ""                           # report folder (default runs/<dataset>/ddm-<protocol>)
    train_only: bool = False                   # fine-tune the arms, skip sampling and the report


AUTHORS = dict(finetune="lora", lora_alpha=32.0, lr=1e-5, weight_decay=1e-2, grad_clip=1.0,
               grad_clip_mode="value", warmup=0, ema_decay=0.0, batch_size=4, steps=1000)
PRESETS = {
    "prior": {
        "tiny": {**AUTHORS, "alphas": "0,0.5", "adversarial": "0.5", "seeds": "0,1", "train_ratios": "1:4,1:1",
                 "n_finetune": 400, "steps": 40, "lr": 1e-3, "ckpt_every": 40, "n_samples": 100, "sample_steps": 10},
        "small": {**AUTHORS, "ckpt_every": 1000},
        "full": {**AUTHORS, "seeds": "0,1,2,3,4,5,6,7,8,9", "ckpt_every": 1000, "n_samples": 2000}},
    "biased-base": {
        "tiny": dict(alphas="0,0.5", adversarial="", seeds="0", finetune="full", lora_alpha=1.0, steps=60,
                     batch_size=64, lr=5e-4, n_train=2000, warmup=10, ckpt_every=60, n_samples=200,
                     guidance_scales="2", sample_steps=10),
        "small": dict(alphas="0,0.01,0.05,0.1,0.2,0.5", adversarial="", seeds="0", finetune="full", lora_alpha=1.0,
                      steps=500, batch_size=1024, lr=1e-4, ckpt_every=500, warmup=50, n_samples=2000,
                      guidance_scales="2", sample_steps=50),
        "full": dict(alphas="0,0.005,0.01,0.05,0.1,0.2,0.5", adversarial="", seeds="0,1,2", finetune="full",
                     lora_alpha=1.0, steps=2000, batch_size=1024, lr=1e-4, ckpt_every=1000, n_samples=5000,
                     guidance_scales="2", sample_steps=50)}}
# CelebA's 16×16 latents make a biased-base step compute-bound, so its fine-tunes take batch 256.
CELEBA_OVERRIDES = {"biased-base": {"small": dict(batch_size=256)}}


# ------------------------------------------------------------------------------------------ model
class Indicator(nn.Module):
    """C: flattened ε̂ [B, d] -> group logits [B, K] (the authors' 1024-512 MLP)."""

    def __init__(self, d: int, num_groups: int, hidden=(1024, 512)):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, hidden[0]), nn.ReLU(), nn.Linear(hidden[0], hidden[1]),
                                 nn.ReLU(), nn.Linear(hidden[1], num_groups))

    def forward(self, eps_hat):                                   # [B, c, h, w]
        return self.net(eps_hat.flatten(1))                       # [B, K]


class LoRALinear(nn.Module):
    """y = W x + (lora_alpha / r) · B A x, W frozen, A ~ Kaiming, B = 0 (Hu et al. 2021)."""

    def __init__(self, base: nn.Linear, r: int, lora_alpha: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.A = nn.Parameter(torch.empty(r, base.in_features))
        self.B = nn.Parameter(torch.zeros(base.out_features, r))
        nn.init.kaiming_uniform_(self.A, a=5 ** 0.5)
        self.scale = lora_alpha / r

    def forward(self, x):
        return self.base(x) + (x @ self.A.T @ self.B.T) * self.scale


def add_lora(unet: nn.Module, r: int, lora_alpha: float):
    """Freeze the UNet; wrap the q and v projections of every attention layer in LoRA."""
    unet.requires_grad_(False)
    for m in unet.modules():
        if isinstance(m, Attention):
            m.q, m.v = LoRALinear(m.q, r, lora_alpha), LoRALinear(m.v, r, lora_alpha)


class DDMModel(nn.Module):
    """The denoiser and the indicator, trained together: forward -> (output, C(ε̂))."""

    def __init__(self, unet, indicator, scheduler):
        super().__init__()
        self.unet, self.indicator, self.scheduler = unet, indicator, scheduler

    def forward(self, z_t, t, cond, grad_sign=1.0):
        output = self.unet(z_t, t, cond)                           # ε̂ (or v̂) [B, c, h, w]
        _, eps_hat = self.scheduler.split_output(output.float(), t, z_t)
        eps_hat = eps_hat.detach() + grad_sign * (eps_hat - eps_hat.detach())   # value ε̂, gradient × ±1
        return output, self.indicator(eps_hat)                     # [B, c, h, w], [B, K]


def ddm_loss(output, target, logits, y, alpha, ce_mask=None):
    """(1 − α)·MSE(output, target) + α·CE(logits, y) over the last batch axis: output, target
    [..., B, c, h, w], logits [..., B, K], y [..., B], α a number or [...] -> [...] (e.g. one per arm)."""
    mse = (output.float() - target).square().flatten(-4).mean(-1)                       # [...]
    ce = F.cross_entropy(logits.float().flatten(0, -2), y.flatten(), reduction="none").view(y.shape)   # [..., B]
    ce = ce.mean(-1) if ce_mask is None else (ce * ce_mask).sum(-1) / ce_mask.sum(-1).clamp(min=1)   # [...]
    return (1 - alpha) * mse + alpha * ce


def new_rows(protocol: str, scenario: str, num_groups: int) -> int:
    """Class-table rows an arm appends after ∅: the prompt (prior FD), one per group (SPD), none
    (biased-base FD, which fine-tunes ∅ itself)."""
    return num_groups if scenario == "spd" else (1 if protocol == "prior" else 0)


def class_row(protocol: str, scenario: str, null: int, y: torch.Tensor) -> torch.Tensor:
    """The class row an arm conditions on for samples of group y (int64 tensor), in training,
    sampling and diagnostics alike: its group's row (SPD), the prompt row (prior FD), or ∅ itself
    (biased-base FD). The rows new_rows appends follow ∅ = null."""
    return null + 1 + y if scenario == "spd" else torch.full_like(y, null + 1 if protocol == "prior" else null)


def arm_model(pipe, cfg: DDMConfig, scenario: str, num_groups: int, seed: int) -> DDMModel:
    """A copy of the base model with its new class rows (each initialised to ∅'s), LoRA if asked, and a
    fresh indicator, all seeded by `seed`. Row K_base is still ∅; the new rows follow it."""
    torch.manual_seed(seed)
    unet = ddpm.build_unet(pipe.cfg, pipe.unet.num_classes, pipe.latent_shape[0]).to(pipe.device)
    unet.load_state_dict(pipe.unet.state_dict())
    rows = new_rows(cfg.protocol, scenario, num_groups)
    if rows:
        table = unet.class_emb.weight.detach()                                   # [K_base + 1, E]
        null_row = table[unet.num_classes]
        unet.class_emb = nn.Embedding(len(table) + rows, table.shape[1]).to(pipe.device)
        unet.class_emb.weight.data.copy_(torch.cat([table, null_row.expand(rows, -1)]))
    if cfg.finetune == "lora":
        add_lora(unet, cfg.lora_rank, cfg.lora_alpha)
        unet.class_emb.requires_grad_(rows > 0)
    d = pipe.latent_shape[0] * pipe.latent_shape[1] * pipe.latent_shape[2]
    return DDMModel(unet, Indicator(d, num_groups), ddpm.build_scheduler(pipe.cfg, "ddpm")).to(pipe.device)


# ------------------------------------------------------------------------------------------- arms
@dataclass(frozen=True)
class Arm:
    scenario: str
    ratio: str          # "1:4" (prior) or "" (biased-base: the base's own training data)
    kind: str           # ddm | rebalanced | adversarial
    alpha: float
    seed: int

    @property
    def name(self):
        return " ".join(filter(None, [self.scenario, self.ratio, self.kind, f"α={self.alpha:g}", f"s{self.seed}"]))


def parse_list(cfg, flag: str, kind=float) -> list:
    value = getattr(cfg, flag)
    try:
        return [kind(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--{flag.replace('_', '-')} {value!r}: expected comma-separated {kind.__name__}s") from None


def parse_ratio(ratio: str) -> float:
    """'1:4' -> the share of group 0, 0.2."""
    try:
        a, b = (float(x) for x in ratio.split(":"))
        assert a >= 0 and b >= 0 and a + b > 0
    except (ValueError, AssertionError):
        raise ConfigError(f"--train-ratios: {ratio!r} is not a ratio like 1:4 (group 0 : group 1)") from None
    return a / (a + b)


def check(cfg: DDMConfig) -> None:
    """Every flag of the sweep, before anything trains."""
    if cfg.protocol not in PROTOCOLS:
        raise ConfigError(f"--protocol {cfg.protocol!r}: choose {' or '.join(PROTOCOLS)}")
    for flag in ("alphas", "adversarial"):
        if any(not 0 <= a <= 1 for a in parse_list(cfg, flag)):
            raise ConfigError(f"--{flag} {getattr(cfg, flag)}: every α must lie in [0, 1]")
    if 0 not in parse_list(cfg, "alphas"):
        raise ConfigError(f"--alphas {cfg.alphas}: include 0, the plain fine-tune every arm is read against")
    if not set(cfg.scenarios.split(",")) <= set(SCENARIOS):
        raise ConfigError(f"--scenarios {cfg.scenarios}: choose from {', '.join(SCENARIOS)}")
    if not parse_list(cfg, "seeds", int):
        raise ConfigError("--seeds is empty: give at least one seed, e.g. 0")
    if cfg.finetune not in ("full", "lora"):
        raise ConfigError(f"--finetune {cfg.finetune!r}: choose full or lora")
    if any(s <= 0 for s in parse_list(cfg, "guidance_scales")) or not parse_list(cfg, "guidance_scales"):
        raise ConfigError(f"--guidance-scales {cfg.guidance_scales!r}: positive numbers, e.g. 1,7.5")
    if cfg.n_samples < 2 or cfg.n_finetune < 2 or cfg.sample_steps < 1 or cfg.lora_rank < 1:
        raise ConfigError(f"--n-samples {cfg.n_samples} and --n-finetune {cfg.n_finetune} must be >= 2, "
                          f"--sample-steps {cfg.sample_steps} and --lora-rank {cfg.lora_rank} >= 1")
    for ratio in cfg.train_ratios.split(",") if cfg.protocol == "prior" else []:
        parse_ratio(ratio)
    check_train_config(cfg)


def sweep_arms(cfg: DDMConfig, scenario: str) -> list:
    """Every arm of one scenario: per ratio and seed, the α sweep, the rebalanced baseline (prior, at
    an unbalanced ratio) and the adversarial ablation."""
    ratios = cfg.train_ratios.split(",") if cfg.protocol == "prior" else [""]
    arms = []
    for ratio in ratios:
        for seed in parse_list(cfg, "seeds", int):
            arms += [Arm(scenario, ratio, "ddm", a, seed) for a in parse_list(cfg, "alphas")]
            if ratio and parse_ratio(ratio) != 0.5:
                arms.append(Arm(scenario, ratio, "rebalanced", 0.0, seed))
            arms += [Arm(scenario, ratio, "adversarial", a, seed) for a in parse_list(cfg, "adversarial")]
    return arms


def training_pools(pipe, cfg: DDMConfig, arms: list) -> tuple:
    """The fine-tuning data of every arm: (latents {z0, group} of all subsets, one after another,
    pools: per arm the indices it draws from). Rebalanced: the minority group's indices repeated (with
    replacement, seeded) until both groups are as large as the majority."""
    vae_dir = pipe.run_dir.parent / pipe.cfg.vae
    subsets, z0, group, offset = {}, [], [], 0
    for ratio in dict.fromkeys(arm.ratio for arm in arms):
        sub_cfg = ddpm.data_config(cfg) if not ratio else replace(
            ddpm.data_config(cfg), bias=parse_ratio(ratio), n_train=cfg.n_finetune, cell_ratio="")
        lat = vae_lib.encode_dataset(pipe.vae, vae_dir, sub_cfg, pipe.device)
        subsets[ratio] = (offset, lat["group"])
        z0.append(lat["z0"])
        group.append(lat["group"])
        offset += len(lat["z0"])
    pools = []
    for arm in arms:
        start, g = subsets[arm.ratio]
        idx = torch.arange(len(g), device=g.device)
        if arm.kind == "rebalanced":
            members = [idx[g == k] for k in range(int(g.max()) + 1)]
            size = max(len(m) for m in members)
            gen = torch.Generator().manual_seed(arm.seed)
            idx = torch.cat([m[torch.randint(len(m), (size,), generator=gen).to(m.device)] if len(m) < size else m
                             for m in members])
        pools.append(start + idx)
    return {"z0": torch.cat(z0), "group": torch.cat(group)}, pools


def finetune(pipe, cfg: DDMConfig, scenario: str, arms: list, num_groups: int, out: Path) -> Stacked:
    """Train every arm of the scenario as one stacked model (each with its own seed, data and α)."""
    latents, pools = training_pools(pipe, cfg, arms)
    z0, group = latents["z0"], latents["group"]                               # [N, c, h, w], [N]
    stack = Stacked([arm_model(pipe, cfg, scenario, num_groups, arm.seed) for arm in arms])
    scheduler, null, device = stack.template.scheduler, pipe.unet.num_classes, pipe.device
    alpha = torch.tensor([arm.alpha for arm in arms], device=device)                      # [A]
    sign = torch.tensor([-1.0 if arm.kind == "adversarial" else 1.0 for arm in arms], device=device)
    p_uncond = pipe.cfg.p_uncond if cfg.protocol == "biased-base" and scenario == "spd" else 0.0

    def draw(pool, gen):                                  # one arm's batch, as a lone run would draw it
        idx = pool[torch.randint(len(pool), (cfg.batch_size,), generator=gen, device=device)]
        y = group[idx]                                    # used by the loss only
        cond = class_row(cfg.protocol, scenario, null, y)
        if p_uncond:                                      # biased-base SPD: label dropout to ∅
            cond = ddpm.drop_labels(cond, null, p_uncond, gen)
        z_t, t, noise = ddpm.noisy_batch(scheduler, z0[idx], gen)
        return z_t, t, cond, scheduler.target(z0[idx], noise, t), y

    def loss_fn(net, step, gens):
        z_t, t, cond, target, y = (torch.stack(x) for x in zip(*(draw(p, g) for p, g in zip(pools, gens))))
        output, logits = net(z_t, t, cond, sign)                             # [A, B, c, h, w], [A, B, K]
        mask = (t < cfg.ce_max_t) if cfg.ce_max_t >= 0 else None
        return ddm_loss(output, target, logits, y, alpha, mask)             # [A]

    stats = train(stack, loss_fn, cfg, out, device=device, desc=f"ddm {scenario} ({len(arms)} arms)",
                  arm_seeds=[arm.seed for arm in arms])
    if not math.isnan(stats["img_per_s"]):                    # NaN: nothing left to train, reused
        print(f"{scenario}: {len(arms)} arms, {stats['step']} steps in {stats['seconds']:.0f}s "
              f"({stats['img_per_s']:.0f} img/s over all arms)")
    return stack.eval()


# ------------------------------------------------------------------------------------------ sweep
def run_sweep(cfg: DDMConfig, preset: str, runs: str, device: str, fresh=False, evaluator=None) -> dict:
    """Base model -> every arm of every scenario (stacked) -> samples -> ddm_report.write_report."""
    check(cfg)
    t_start = time.perf_counter()
    data_cfg = ddpm.data_config(cfg)
    if cfg.protocol == "prior":                   # the prior: the same data at 1:1, every image it has
        data_cfg = replace(data_cfg, bias=0.5, cell_ratio="")
    base_cfg = ddpm.base_config(data_cfg, preset, **runtime_flags(cfg))
    pipe = ddpm.ensure_base(base_cfg, preset, runs, device, fresh)
    num_groups = len(cfg.colors.split(",")) if cfg.dataset == "cmnist" else 2
    evaluator = None if cfg.train_only else (evaluator or evaluate.get_evaluator(pipe.data_cfg, runs, device))
    test = vae_lib.encode_dataset(pipe.vae, pipe.run_dir.parent / pipe.cfg.vae, pipe.data_cfg, device, split="test")
    confusion = None if cfg.train_only else ddm_report.reader_confusion(pipe, evaluator, test)
    results = {}
    for scenario in cfg.scenarios.split(","):
        arms = sweep_arms(cfg, scenario)
        arm_cfg = replace(cfg, scenarios=scenario, report="", train_only=False,   # what the arms learn from
                          n_samples=DDMConfig.n_samples, guidance_scales=DDMConfig.guidance_scales,
                          sample_steps=DDMConfig.sample_steps, snapshots=",".join(map(str, trajectory_steps(cfg))))
        out = Path(runs) / cfg.dataset / f"ddm-{cfg.protocol}-{scenario}-{config_hash(arm_cfg)}-{pipe.run_dir.name}"
        if fresh:
            for old in [out / "ckpt.pt", out / "log.jsonl", *out.glob("ema_step*.pt")]:
                old.unlink(missing_ok=True)
        stack = finetune(pipe, arm_cfg, scenario, arms, num_groups, out)
        if not cfg.train_only:
            results[scenario] = ddm_report.evaluate_scenario(pipe, stack, arms, cfg, scenario, num_groups, evaluator,
                                                             test, confusion, out)
    if cfg.train_only:
        return {}
    return ddm_report.write_report(results, cfg, pipe, evaluator, confusion, report_dir(cfg, runs), preset=preset,
                                   wall_seconds=time.perf_counter() - t_start)


def report_dir(cfg: DDMConfig, runs: str) -> Path:
    """--report, else runs/<dataset>/ddm-<protocol>-<hash of the sweep's config>: a second sweep never
    overwrites the first."""
    return Path(cfg.report or Path(runs) / cfg.dataset / f"ddm-{cfg.protocol}-{config_hash(replace(cfg, report=''))}")


def trajectory_steps(cfg: DDMConfig) -> list:
    """The steps whose EMA weights are kept for the trajectory: 25% and 50% of the fine-tune."""
    return sorted({s for s in (cfg.steps // 4, cfg.steps // 2) if 0 < s < cfg.steps})


def configure(argv=None) -> tuple:
    """The command line -> (DDMConfig, args): protocol preset, then CelebA's, then explicit flags."""
    cfg, args = parse_config(DDMConfig, {}, argv, description="DDM: α sweep over seeds, FD and SPD, report")
    explicit = explicit_flags(DDMConfig, args)
    protocol = explicit.get("protocol", cfg.protocol)
    if protocol not in PROTOCOLS:
        raise ConfigError(f"--protocol {protocol!r}: choose {' or '.join(PROTOCOLS)}")
    celeba = CELEBA_OVERRIDES.get(protocol, {}).get(args.preset, {}) if cfg.dataset == "celeba" else {}
    cfg = DDMConfig(**{**asdict(cfg), **PRESETS[protocol][args.preset], **celeba, **explicit})
    check(cfg)
    return cfg, args


def main(argv=None):
    cfg, args = configure(argv)
    torch.backends.cuda.matmul.allow_tf32 = True       # the stacked arms' float32 matmuls on tensor cores
    run_sweep(cfg, args.preset, args.runs, args.device, args.fresh)
    if not cfg.train_only:
        print(f"report: {report_dir(cfg, args.runs) / 'report.md'}")


if __name__ == "__main__":
    main_guard(main)
