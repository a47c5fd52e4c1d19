"""DDM, the Debiasing Diffusion Model (arXiv 2503.12536): an indicator on the predicted noise.

An indicator C reads the denoiser's predicted noise ε̂ = ε_θ(z_t, t, c) (flattened; no t input):

    C:  ε̂ [B, c·h·w] -> Linear(d, 1024) -> ReLU -> Linear(1024, 512) -> ReLU -> Linear(512, K) logits

and the fine-tuning loss adds its cross-entropy on the sensitive group y:

    L = (1 − α) · ‖ε̂ − ε‖²  +  α · CE(C(ε̂), y)

Both ε_θ and C *minimise* the CE (cooperative, no gradient reversal; one AdamW over both), as in the
authors' code. y is used in training only: sampling is the plain sampler of the fine-tuned model and
never takes a group argument. α = 0 is the plain fine-tune baseline.

Setting (the paper fine-tunes Stable Diffusion with LoRA r = 8 on attention q/v): here every arm
fine-tunes the shared base model of ddpm.py on the biased training set, same steps and seeds.
`--finetune lora` wraps the attention q and v projections with a hand-written LoRA instead.

Two scenarios:
* FD  — unconditional generation. The arm fine-tunes the null-class (∅) model (every training
        label is ∅, which is exactly the model we sample) and is scored by the balance of its
        samples' groups, FD = |p̂ − ½| (and ‖p̂ − u‖₂).
* SPD — the attribute is given as a condition. The class embedding is replaced by one over the
        groups (+ ∅, label dropout 10%), every row initialised to the base model's ∅ row, and
        SPD = |P(sample shows group a | cond = a) − P(sample shows group b | cond = b)|.

Diagnostic from the authors: the entropy of C's prediction on the arm's own generated samples
(noised at a random t, ε̂ from the arm), mean ± std. `--ce-max-t` restricts the CE to t < value
(one of the variants to try when the effect is absent at small scale).
"""
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import ddpm
import evaluate
import vae as vae_lib
from train import (ConfigError, TrainConfig, config_hash, explicit_flags, local_batch, main_guard,
                   parse_config, runtime_flags, train)

SCENARIOS = ("fd", "spd")


@dataclass
class DDMConfig(data.DataConfig, TrainConfig):
    alphas: str = "0,0.01,0.05,0.1,0.2,0.5"   # the α sweep
    scenarios: str = "fd,spd"
    seeds: str = "0"                           # one fine-tune per (α, seed)
    finetune: str = "full"                     # full | lora
    lora_rank: int = 8
    ce_max_t: int = -1                         # CE only where t < ce_max_t (-1: every t)
    n_samples: int = 2000                      # samples per arm (SPD: per group)
    guidance_scale: float = 2.0                # CFG scale in the SPD scenario
    report: str = ""                           # report folder (default runs/<dataset>/ddm)
    train_only: bool = False                   # fine-tune the arms, skip sampling and the report
                                               # (to train arms in parallel processes, then report)


PRESETS = {
    "tiny": dict(alphas="0,0.5", steps=60, batch_size=64, lr=5e-4, n_train=2000, warmup=10,
                 ckpt_every=60, n_samples=200),
    "small": dict(steps=500, batch_size=1024, lr=1e-4, ckpt_every=500, warmup=50),
    "full": dict(alphas="0,0.005,0.01,0.05,0.1,0.2,0.5", seeds="0,1,2", steps=2000, batch_size=1024,
                 lr=1e-4, ckpt_every=1000, n_samples=5000),
}
# CelebA's 16×16 latents make a step compute-bound (about 155 ms at batch 1024 on an H100, against
# ~50 ms for cmnist's 8×8 at any batch), so its fine-tunes take batch 256: 500 steps are still about
# 18 passes over the 7,000 training faces.
CELEBA_OVERRIDES = {"small": dict(batch_size=256)}


class Indicator(nn.Module):
    """C: flattened ε̂ [B, d] -> group logits [B, K] (the authors' 1024-512 MLP)."""

    def __init__(self, d: int, num_groups: int, hidden=(1024, 512)):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, hidden[0]), nn.ReLU(), nn.Linear(hidden[0], hidden[1]),
                                 nn.ReLU(), nn.Linear(hidden[1], num_groups))

    def forward(self, eps_hat):                                   # [B, c, h, w]
        return self.net(eps_hat.flatten(1))                       # [B, K]


class LoRALinear(nn.Module):
    """y = W x + (B A x) · (rank_scale / r), W frozen, A ~ Kaiming, B = 0 (Hu et al. 2021)."""

    def __init__(self, base: nn.Linear, r: int, rank_scale: float = 1.0):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.A = nn.Parameter(torch.empty(r, base.in_features))
        self.B = nn.Parameter(torch.zeros(base.out_features, r))
        nn.init.kaiming_uniform_(self.A, a=5 ** 0.5)
        self.scale = rank_scale / r

    def forward(self, x):
        return self.base(x) + (x @ self.A.T @ self.B.T) * self.scale


def add_lora(unet: nn.Module, r: int):
    """Freeze the UNet; wrap every attention q and v projection in LoRA (only those train)."""
    unet.requires_grad_(False)
    from unet import Attention
    for m in unet.modules():
        if isinstance(m, Attention):
            m.q, m.v = LoRALinear(m.q, r), LoRALinear(m.v, r)


class DDMModel(nn.Module):
    """The denoiser and the indicator, trained together: forward -> (output, C(ε̂))."""

    def __init__(self, unet, indicator, scheduler):
        super().__init__()
        self.unet, self.indicator, self.scheduler = unet, indicator, scheduler

    def forward(self, z_t, t, cond):
        output = self.unet(z_t, t, cond)                           # ε̂ (or v̂) [B, c, h, w]
        _, eps_hat = self.scheduler.split_output(output.float(), t, z_t)
        return output, self.indicator(eps_hat)                     # [B, c, h, w], [B, K]


def ddm_loss(output, target, logits, y, alpha: float, ce_mask=None):
    """(1 − α)·MSE(output, target) + α·CE(logits, y); ce_mask [B] bool limits the CE's samples."""
    mse = F.mse_loss(output.float(), target)
    ce = F.cross_entropy(logits.float(), y, reduction="none")                 # [B]
    if ce_mask is not None:
        ce = (ce * ce_mask).sum() / ce_mask.sum().clamp(min=1)
    else:
        ce = ce.mean()
    return (1 - alpha) * mse + alpha * ce


def arm_model(pipe, scenario: str, num_groups: int, cfg: DDMConfig, seed: int) -> DDMModel:
    """A fresh copy of the base model (+ group embedding for SPD, + LoRA) and a fresh indicator."""
    torch.manual_seed(seed)
    unet = ddpm.build_unet(pipe.cfg, pipe.unet.num_classes, pipe.latent_shape[0]).to(pipe.device)
    unet.load_state_dict(pipe.unet.state_dict())
    if scenario == "spd":  # condition on the group instead: every row starts as the base's ∅ row
        null_row = unet.class_emb.weight[unet.num_classes].detach()
        unet.class_emb = nn.Embedding(num_groups + 1, null_row.numel()).to(pipe.device)
        unet.class_emb.weight.data.copy_(null_row.expand(num_groups + 1, -1))
        unet.num_classes = num_groups
    if cfg.finetune == "lora":
        add_lora(unet, cfg.lora_rank)
        unet.class_emb.requires_grad_(scenario == "spd")
    d = pipe.latent_shape[0] * pipe.latent_shape[1] * pipe.latent_shape[2]
    return DDMModel(unet, Indicator(d, num_groups), ddpm.build_scheduler(pipe.cfg, "ddpm")).to(pipe.device)


def finetune(pipe, latents, arm_cfg: DDMConfig, alpha: float, scenario: str, out: Path) -> DDMModel:
    z0, group = latents["z0"], latents["group"]                    # [N, c, h, w], [N]
    K = int(group.max()) + 1
    model = arm_model(pipe, scenario, K, arm_cfg, arm_cfg.seed)
    scheduler, null = model.scheduler, model.unet.num_classes

    def loss_fn(net, step, gen):
        idx = torch.randint(len(z0), (local_batch(arm_cfg.batch_size),), generator=gen, device=z0.device)
        y = group[idx]                                             # used by the loss only
        cond = (ddpm.drop_labels(y, null, pipe.cfg.p_uncond, gen) if scenario == "spd"
                else torch.full_like(y, null))
        z_t, t, noise = ddpm.noisy_batch(scheduler, z0[idx], gen)
        output, logits = net(z_t, t, cond)
        mask = (t < arm_cfg.ce_max_t) if arm_cfg.ce_max_t >= 0 else None
        return ddm_loss(output, scheduler.target(z0[idx], noise, t), logits, y, alpha, mask)

    train(model, loss_fn, arm_cfg, out, device=pipe.device, desc=f"ddm {scenario} α={alpha}")
    return model.eval()


@torch.inference_mode()
def indicator_entropy(model: DDMModel, z0_samples, seed=0):
    """Entropy of C(ε̂) on generated latents noised at a random t: (mean, std) in nats."""
    gen = torch.Generator(z0_samples.device).manual_seed(seed)
    z_t, t, _ = ddpm.noisy_batch(model.scheduler, z0_samples, gen)
    _, logits = model(z_t, t, None)
    p = logits.float().softmax(-1)
    h = -(p * p.clamp_min(1e-12).log()).sum(-1)
    return float(h.mean()), float(h.std())


def run_sweep(cfg: DDMConfig, preset: str, runs: str, device: str, fresh=False, evaluator=None) -> dict:
    """Base model -> every (scenario, α, seed) arm -> samples -> evaluate.evaluate_arms."""
    alphas = [float(a) for a in cfg.alphas.split(",")]
    scenarios = cfg.scenarios.split(",")
    if any(a < 0 or a > 1 for a in alphas):
        raise ConfigError(f"--alphas {cfg.alphas}: every α must lie in [0, 1]")
    if any(s not in SCENARIOS for s in scenarios):
        raise ConfigError(f"--scenarios {cfg.scenarios}: choose from {', '.join(SCENARIOS)}")
    if cfg.finetune not in ("full", "lora"):
        raise ConfigError(f"--finetune {cfg.finetune!r}: choose full or lora")
    t_start = time.perf_counter()
    base_cfg = ddpm.base_config(ddpm.data_config(cfg), preset, **runtime_flags(cfg))
    pipe = ddpm.ensure_base(base_cfg, preset, runs, device, fresh)
    data_cfg = pipe.data_cfg                     # exactly the data the base model was trained on
    latents = vae_lib.encode_dataset(pipe.vae, pipe.run_dir.parent / pipe.cfg.vae, data_cfg, device)
    evaluator = None if cfg.train_only else (evaluator or evaluate.get_evaluator(data_cfg, runs, device))
    K = int(latents["group"].max()) + 1
    arms = []
    for scenario in scenarios:
        for seed in [int(s) for s in cfg.seeds.split(",")]:
            for alpha in alphas:
                arm_cfg = replace(cfg, alphas=str(alpha), scenarios=scenario, seeds=str(seed), seed=seed,
                                  report="", train_only=False)
                out = Path(runs) / cfg.dataset / f"ddm-{scenario}-a{alpha:g}-s{seed}-{config_hash(arm_cfg)}-{pipe.run_dir.name}"
                if fresh and (out / "ckpt.pt").exists():
                    (out / "ckpt.pt").unlink()
                model = finetune(pipe, latents, arm_cfg, alpha, scenario, out)
                if cfg.train_only:
                    continue
                arm = {"name": f"{scenario} α={alpha:g}" + (f" s{seed}" if "," in cfg.seeds else ""),
                       "scenario": scenario, "alpha": alpha, "seed": seed}
                t_sample = time.perf_counter()
                if scenario == "fd":  # unconditional: the sampler never sees y
                    z = pipe.sample_latents(cfg.n_samples, None, seed=1000 + seed, model=model.unet)
                    arm["images"] = pipe.decode(z)
                else:
                    per_group = {}
                    for g in range(K):
                        cond = torch.full((cfg.n_samples,), g, dtype=torch.long)
                        z = pipe.sample_latents(cfg.n_samples, cond, seed=1000 + seed + g, model=model.unet,
                                                guidance_scale=cfg.guidance_scale)
                        per_group[g] = pipe.decode(z)
                    arm["cond_images"] = per_group
                arm["entropy_mean"], arm["entropy_std"] = indicator_entropy(model, z)
                arms.append(arm)
                print(f"{arm['name']}: sampled in {time.perf_counter() - t_sample:.1f}s")
    if cfg.train_only:
        return {}
    report = Path(cfg.report or Path(runs) / cfg.dataset / "ddm")
    metrics = evaluate.evaluate_arms(
        arms, evaluator, data_cfg, report, method="ddm", preset=preset, device_name=device_name(device),
        extra={"config": asdict(cfg), "base_model": str(pipe.run_dir), "wall_seconds": time.perf_counter() - t_start})
    return metrics


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if str(device).startswith("cuda") else "cpu"


def main(argv=None):
    cfg, args = parse_config(DDMConfig, {}, argv, description="DDM: α sweep, FD and SPD scenarios, report")
    celeba = CELEBA_OVERRIDES.get(args.preset, {}) if cfg.dataset == "celeba" else {}
    values = {**asdict(cfg), **PRESETS[args.preset], **celeba, **explicit_flags(DDMConfig, args)}
    cfg = DDMConfig(**values)
    run_sweep(cfg, args.preset, args.runs, args.device, args.fresh)   # prints the final table
    if not cfg.train_only:
        print(f"report: {Path(cfg.report or Path(args.runs) / cfg.dataset / 'ddm') / 'report.md'}")


if __name__ == "__main__":
    main_guard(main)
