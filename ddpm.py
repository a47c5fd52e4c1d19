"""Denoising diffusion in the autoencoder's latent space: schedules, DDPM/DDIM, loss and sampler.

Forward process (Ho et al. 2020), with ᾱ_t = Π_{s≤t} (1 − β_s) = `alphas_cumprod[t]`, t ∈ [0, T−1]:
    q(z_t | z_0) = N(√ᾱ_t z_0, (1 − ᾱ_t) I)        ->  add_noise(z0, ε, t) = √ᾱ_t z0 + √(1−ᾱ_t) ε
Training (LDM, Rombach et al. 2022), on latents z_0 = scale · E(x):
    L = E_{t, ε, c} ‖ ε − ε_θ(z_t, t, c) ‖²      (c → ∅ with probability p_uncond; or the v target
                                                   v = √ᾱ_t ε − √(1−ᾱ_t) z_0, Salimans & Ho 2022)
DDPM step (posterior of Ho et al. eq. 7, between consecutive entries t > t' of `timesteps`):
    ẑ_0 = (z_t − √(1−ᾱ_t) ε̂) / √ᾱ_t,   β' = 1 − ᾱ_t / ᾱ_t'
    μ = √ᾱ_t' β' / (1−ᾱ_t) · ẑ_0 + √(1−β') (1−ᾱ_t') / (1−ᾱ_t) · z_t,   σ² = (1−ᾱ_t')/(1−ᾱ_t) · β'
DDIM step (Song et al. 2021, eq. 12), ᾱ at t' = −1 taken as 1:
    σ = η √((1−ᾱ_t')/(1−ᾱ_t)) √(1 − ᾱ_t/ᾱ_t'),   z_t' = √ᾱ_t' ẑ_0 + √(1−ᾱ_t'−σ²) ε̂ + σ·noise

Names follow diffusers (`add_noise`, `set_timesteps`, `step`, `betas`, `alphas_cumprod`,
`timesteps`) so knowledge maps both ways. Two differences from diffusers' defaults, both deliberate:
`timestep_spacing="trailing"` (sampling starts at t = T−1; diffusers defaults to "leading", which
never visits the noisiest step), and the previous timestep is read from the `timesteps` list,
never recomputed from a stride formula.

`python ddpm.py --dataset cmnist` trains the class-conditional base model on the biased training
set (reusing or training the autoencoder first) and writes samples.png (one row per class),
samples_uncond.png, loss.png and the EMA weights.
"""
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure          # not pyplot: leaves a notebook's backend alone
from torchvision.utils import save_image
from tqdm import tqdm

import data
import vae as vae_lib
from config import (ConfigError, TrainConfig, check_train_config, config_hash, explicit_flags, from_fields, int_list,
                    main_guard, parse_config, runtime_flags)
from train import distributed, load_checkpoint, local_batch, seed_everything, train
from unet import UNet, count_parameters

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
PREDICTION_TYPES = ("epsilon", "v_prediction")


# -------------------------------------------------------------------------------------- schedules
def make_betas(schedule: str, T: int, beta_start: float, beta_end: float) -> torch.Tensor:
    if schedule == "linear":                     # Ho et al. 2020
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if schedule == "scaled_linear":              # LDM / Stable Diffusion: linear in √β
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float64) ** 2
    if schedule == "cosine":                     # Nichol & Dhariwal 2021: ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2)
        s = 0.008
        f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    raise ConfigError(f"unknown beta schedule {schedule!r}; choose one of {', '.join(BETA_SCHEDULES)}")


class DDPMScheduler:
    def __init__(self, num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                 beta_end=0.012, prediction_type="epsilon"):
        if prediction_type not in PREDICTION_TYPES:
            raise ConfigError(f"unknown prediction type {prediction_type!r}; choose {' or '.join(PREDICTION_TYPES)}")
        self.num_train_timesteps = num_train_timesteps
        self.prediction_type = prediction_type
        self.betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, dim=0)            # float64 [T]
        self._table = self.alphas_cumprod.float()
        self.set_timesteps(num_train_timesteps)

    def set_timesteps(self, num_inference_steps: int):
        """Trailing spacing: T−1, …, down to about T/n − 1; e.g. T=1000, n=4 -> [999, 749, 499, 249]."""
        T = self.num_train_timesteps
        if not 1 <= num_inference_steps <= T:
            raise ConfigError(f"{num_inference_steps} sampling steps; choose 1..{T}")
        self.timesteps = (torch.arange(T, 0, -T / num_inference_steps).round().long() - 1)
        self.prev_timesteps = torch.cat([self.timesteps[1:], torch.tensor([-1])])
        self._position = {int(t): i for i, t in enumerate(self.timesteps)}

    def _alpha_bar(self, t: int) -> float:
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])

    def _gather(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """alphas_cumprod[t] for a batch of t, shaped to broadcast against x."""
        if self._table.device != x.device:                     # one copy per device, not per call
            self._table = self.alphas_cumprod.float().to(x.device)
        return self._table[t].view(-1, *[1] * (x.dim() - 1))

    def add_noise(self, x0, noise, t):
        a = self._gather(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def get_velocity(self, x0, noise, t):
        a = self._gather(t, x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    def target(self, x0, noise, t):
        return noise if self.prediction_type == "epsilon" else self.get_velocity(x0, noise, t)

    def split_output(self, model_output, t, sample):
        """Model output -> (ẑ_0, ε̂) at timestep(s) t."""
        a = self._gather(t, sample) if torch.is_tensor(t) else torch.tensor(self._alpha_bar(t))
        if self.prediction_type == "epsilon":
            eps = model_output
            x0 = (sample - (1 - a).sqrt() * eps) / a.sqrt()
        else:
            x0 = a.sqrt() * sample - (1 - a).sqrt() * model_output
            eps = a.sqrt() * model_output + (1 - a).sqrt() * sample
        return x0, eps

    def previous(self, t: int) -> int:
        return int(self.prev_timesteps[self._position[int(t)]])

    def posterior(self, x0, sample, t: int, prev_t: int):
        """Mean and variance of q(z_t' | z_t, z_0)."""
        a_t, a_prev = self._alpha_bar(t), self._alpha_bar(prev_t)
        beta = 1 - a_t / a_prev
        mean = (a_prev ** 0.5 * beta / (1 - a_t)) * x0 + ((1 - beta) ** 0.5 * (1 - a_prev) / (1 - a_t)) * sample
        return mean, (1 - a_prev) / (1 - a_t) * beta

    def step(self, model_output, t: int, sample, generator=None):
        prev_t = self.previous(t)
        x0, _ = self.split_output(model_output, t, sample)
        mean, var = self.posterior(x0, sample, t, prev_t)
        if prev_t < 0:
            return mean
        return mean + var ** 0.5 * torch.randn(sample.shape, generator=generator, device=sample.device)


class DDIMScheduler(DDPMScheduler):
    def __init__(self, *args, eta: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.eta = eta

    def step(self, model_output, t: int, sample, generator=None):
        # 1. the previous timestep, from the list
        prev_t = self.previous(t)
        a_t, a_prev = self._alpha_bar(t), self._alpha_bar(prev_t)
        # 2. predicted z_0 and ε (eq. 12's "predicted x_0")
        x0, eps = self.split_output(model_output, t, sample)
        # 3. σ_t(η) (eq. 16)
        sigma = self.eta * ((1 - a_prev) / (1 - a_t)) ** 0.5 * (1 - a_t / a_prev) ** 0.5
        # 4. z_t' = √ᾱ_t' ẑ_0 + "direction pointing to z_t" + σ noise (eq. 12)
        prev = a_prev ** 0.5 * x0 + max(1 - a_prev - sigma ** 2, 0.0) ** 0.5 * eps
        if sigma > 0:
            prev = prev + sigma * torch.randn(sample.shape, generator=generator, device=sample.device)
        return prev


# ---------------------------------------------------------------------------- loss and sampling
def noisy_batch(scheduler, z0, generator):
    """Draw t ~ U{0..T−1} and ε ~ N(0, I); return (z_t, t, ε)."""
    t = torch.randint(0, scheduler.num_train_timesteps, (z0.shape[0],), generator=generator, device=z0.device)
    noise = torch.randn(z0.shape, generator=generator, device=z0.device)
    return scheduler.add_noise(z0, noise, t), t, noise


def drop_labels(label, num_classes: int, p_uncond: float, generator):
    """Replace each label by the null class ∅ = num_classes with probability p_uncond."""
    drop = torch.rand(label.shape, generator=generator, device=label.device) < p_uncond
    return torch.where(drop, torch.full_like(label, num_classes), label)


def diffusion_loss(model, scheduler, z0, cond, generator):
    """‖target − model(z_t, t, c)‖² averaged over the batch (LDM's simple loss)."""
    z_t, t, noise = noisy_batch(scheduler, z0, generator)
    return F.mse_loss(model(z_t, t, cond).float(), scheduler.target(z0, noise, t))


@torch.inference_mode()
def sample_latents(model, scheduler, n, shape, *, cond=None, guidance_scale=1.0, generator=None,
                   device="cpu", batch_size=1000, null_class=None, autocast=True):
    """z_T ~ N(0, I) -> scheduler.step ... -> z_0, for n latents of `shape` [c, h, w].

    model(z, t, cond) -> output; cond [n] int or None (∅). With guidance_scale s ≠ 1 and a cond,
    classifier-free guidance: out = out(∅) + s · (out(c) − out(∅)), both passes in one batch.
    Stacked arms (stack.Stacked): generator is a list, one per arm, and every tensor gains a leading
    arm axis: z [A, n, c, h, w], cond [A, n]. Arm a draws its z_T from its own generator exactly as a
    lone run would, whatever the batch size (a DDIM step with η > 0 draws its noise from arm 0's).
    A model wrapped in cuda_graph.GraphDenoiser replays one captured forward per step."""
    gens = generator if isinstance(generator, list) else None
    batch_dim = -len(shape) - 1                                          # the sample axis
    if gens is None:                    # all of z_T first: the samples do not depend on batch_size
        z_T = torch.randn((n, *shape), generator=generator, device=device)                 # [n, c, h, w]
    else:
        z_T = torch.stack([torch.randn((n, *shape), generator=g, device=device) for g in gens])  # [A, n, …]
    out, bar = [], tqdm(total=len(range(0, n, batch_size)) * len(scheduler.timesteps), leave=False,
                        desc=f"sampling {z_T.shape[:-len(shape)].numel()} latents", unit="step")
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        z = z_T[..., start:start + b, :, :, :]
        c = None if cond is None else cond[..., start:start + b].to(device)
        guided = c is not None and guidance_scale != 1.0
        if guided:
            c = torch.cat([c, torch.full_like(c, null_class)], dim=-1)
        for t in scheduler.timesteps.tolist():
            z_in = torch.cat([z, z], dim=batch_dim) if guided else z
            t_in = torch.full(z_in.shape[:z_in.dim() - len(shape)], t, device=device, dtype=torch.long)   # [(A,) b]
            with torch.autocast("cuda", torch.bfloat16, enabled=autocast and str(device).startswith("cuda")):
                output = model(z_in, t_in, c).float()
            if guided:
                cond_out, null_out = output.chunk(2, dim=batch_dim)
                output = null_out + guidance_scale * (cond_out - null_out)
            z = scheduler.step(output, t, z, generator=gens[0] if gens else generator)
            bar.update()
        out.append(z)
    bar.close()
    return torch.cat(out, dim=batch_dim)


# -------------------------------------------------------------------------------- the base model
@dataclass
class DiffusionConfig(data.DataConfig, TrainConfig):
    channels: str = "128,256"          # UNet width per level (attention at the last one)
    num_res_blocks: int = 2
    norm_groups: int = 32
    dropout: float = 0.0
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction_type: str = "epsilon"
    p_uncond: float = 0.1              # label dropout -> null class, for CFG and unconditional use
    sample_steps: int = 50             # DDIM steps for grids and evaluation
    guidance_scale: float = 2.0        # CFG scale of per-class grids
    vae: str = ""                      # the autoencoder's run dir name (filled in by code)
    preset: str = ""                   # the preset it was built from (filled in by code)


PRESETS = {
    "tiny": dict(channels="16,32", num_res_blocks=1, norm_groups=8, steps=300, batch_size=64,
                 lr=1e-3, n_train=2000, warmup=20, ckpt_every=300, sample_steps=10),
    # On an H100 a step costs ~50 ms whatever the batch up to 1024 (launch-bound, see bench.py),
    # so the GPU presets take large batches and fewer steps.
    "small": dict(channels="128,256", steps=3000, batch_size=1024, lr=4e-4, warmup=200, ckpt_every=1000),
    "full": dict(channels="192,384,384", steps=20000, batch_size=1024, lr=2e-4, warmup=500, ckpt_every=5000),
}
# 16x16 CelebA latents get one more level; a step costs ~1.6x, so `small` takes fewer of them.
CELEBA_OVERRIDES = {"small": dict(channels="128,256,256", steps=2000), "full": dict(channels="192,384,384")}


def check_diffusion_config(cfg: DiffusionConfig):
    """The denoiser's and sampler's flags, checked before the autoencoder trains."""
    if cfg.norm_groups < 1 or cfg.num_res_blocks < 1:
        raise ConfigError(f"--norm-groups {cfg.norm_groups} and --num-res-blocks {cfg.num_res_blocks} must be >= 1")
    uneven = [c for c in int_list("channels", cfg.channels) if c % cfg.norm_groups]
    if uneven:
        raise ConfigError(f"--channels {cfg.channels}: {uneven[0]} is not divisible by --norm-groups {cfg.norm_groups}")
    if cfg.num_train_timesteps < 1:
        raise ConfigError(f"--num-train-timesteps {cfg.num_train_timesteps} must be >= 1")
    if not 1 <= cfg.sample_steps <= cfg.num_train_timesteps:
        raise ConfigError(f"--sample-steps {cfg.sample_steps}: choose 1..{cfg.num_train_timesteps} "
                          f"(--num-train-timesteps)")
    if not 0 <= cfg.p_uncond <= 1:
        raise ConfigError(f"--p-uncond {cfg.p_uncond} is outside [0, 1] (a probability)")
    if not 0 <= cfg.dropout < 1:
        raise ConfigError(f"--dropout {cfg.dropout} is outside [0, 1)")


def build_unet(cfg: DiffusionConfig, num_classes: int, latent_channels=4) -> UNet:
    return UNet(latent_channels, int_list("channels", cfg.channels), cfg.num_res_blocks,
                num_classes, cfg.norm_groups, cfg.dropout)


def build_scheduler(cfg: DiffusionConfig, sampler="ddim", eta=0.0) -> DDPMScheduler:
    kw = dict(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
              beta_start=cfg.beta_start, beta_end=cfg.beta_end, prediction_type=cfg.prediction_type)
    if sampler == "ddim":
        return DDIMScheduler(**kw, eta=eta)
    if sampler == "ddpm":
        return DDPMScheduler(**kw)
    raise ConfigError(f"unknown sampler {sampler!r}; choose ddim or ddpm")


def data_config(cfg) -> data.DataConfig:
    return from_fields(data.DataConfig, asdict(cfg))


class Pipeline:
    """Autoencoder + denoiser + schedule: everything needed to turn noise into images."""

    def __init__(self, cfg: DiffusionConfig, vae, unet, preset="small", device="cpu"):
        self.cfg, self.vae, self.unet, self.preset, self.device = cfg, vae, unet, preset, device
        self.data_cfg = data_config(cfg)
        size = data.CELEBA_SIZE if cfg.dataset == "celeba" else 32
        with torch.no_grad():                                   # [c, h, w] of this autoencoder
            self.latent_shape = tuple(vae.encode(torch.zeros(1, 3, size, size, device=device)).mean.shape[1:])
        unet.eval()

    def sample_latents(self, n, cond=None, seed=0, steps=None, sampler="ddim", eta=0.0,
                       guidance_scale=1.0, model=None, batch_size=1000, autocast=True):
        """seed: an int, or one per arm (a list) for a stacked model (see sample_latents); autocast
        False keeps a CUDA model in float32 (as a stacked model always runs)."""
        scheduler = build_scheduler(self.cfg, sampler, eta)
        scheduler.set_timesteps(steps or (self.cfg.sample_steps if sampler == "ddim" else self.cfg.num_train_timesteps))
        gens = [torch.Generator(self.device).manual_seed(s) for s in (seed if isinstance(seed, list) else [seed])]
        model = model if model is not None else self.unet
        return sample_latents(model, scheduler, n, self.latent_shape, cond=cond, guidance_scale=guidance_scale,
                              generator=gens if isinstance(seed, list) else gens[0], device=self.device,
                              batch_size=batch_size, null_class=getattr(model, "num_classes", self.unet.num_classes),
                              autocast=autocast)

    @torch.inference_mode()
    def decode(self, z0, batch_size=1000):
        return torch.cat([self.vae.decode_latents(z0[i:i + batch_size]) for i in range(0, len(z0), batch_size)])

    def sample(self, n, cond=None, seed=0, **kw):
        """n images, uint8 [n, 3, H, W]; cond None = unconditional (∅), or int64 [n] classes."""
        return self.decode(self.sample_latents(n, cond, seed, **kw))


def grids(pipe: Pipeline, out: Path, num_classes: int, seed=0):
    """samples.png: one row of 10 per class (CFG); samples_uncond.png: 10x10 unconditional."""
    cond = torch.arange(num_classes).repeat_interleave(10)
    x = pipe.sample(len(cond), cond, seed, guidance_scale=pipe.cfg.guidance_scale)
    save_image(x.float() / 255, out / "samples.png", nrow=10)
    save_image(pipe.sample(100, None, seed).float() / 255, out / "samples_uncond.png", nrow=10)


def plot_loss(out: Path):
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    fig = Figure(figsize=(5, 3))
    ax = fig.subplots()
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set(xlabel="step", ylabel="loss", yscale="log", title=out.name)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)


def base_config(data_cfg: data.DataConfig, preset: str, **overrides) -> DiffusionConfig:
    """The base model's config: the preset, except for data fields data_cfg sets away from their
    defaults (e.g. --n-train 500 beats the tiny preset's 2000), then the overrides."""
    chosen = {k for k, v in asdict(data_cfg).items() if v != getattr(data.DataConfig(), k)}
    fields = {**asdict(data_cfg), **{k: v for k, v in PRESETS[preset].items() if k not in chosen}}
    if data_cfg.dataset == "celeba":
        fields.update(CELEBA_OVERRIDES.get(preset, {}))
    fields.update(overrides, preset=preset)
    return from_fields(DiffusionConfig, fields)


def ensure_base(cfg: DiffusionConfig, preset: str, runs: str, device: str, fresh=False) -> Pipeline:
    """Find the base model by its config hash (training the autoencoder and it when missing)."""
    data_cfg = data_config(cfg)
    check_train_config(cfg)                                   # bad flags fail before the autoencoder trains
    check_diffusion_config(cfg)
    rank, world = distributed()                               # first: under torchrun "cuda" is this rank's GPU
    scheduler = build_scheduler(cfg, "ddpm")
    vae, vae_dir = vae_lib.ensure_vae(data_cfg, preset, runs, device, fresh, **runtime_flags(cfg))
    cfg.vae = vae_dir.name
    out = Path(runs) / cfg.dataset / f"base-{config_hash(cfg)}"
    if fresh:
        (out / "ckpt.pt").unlink(missing_ok=True)             # every rank tries; one succeeds
    latents = vae_lib.encode_dataset(vae, vae_dir, data_cfg, device)
    z0, label, K = latents["z0"], latents["label"], latents["num_classes"]   # [N, 4, h, w], [N]
    seed_everything(cfg.seed)                                 # same seed ⇒ same initial weights
    unet = build_unet(cfg, K, z0.shape[1]).to(device)
    pipe = Pipeline(cfg, vae, unet, preset, device)
    shard = torch.arange(rank, len(z0), world, device=device)                # this rank's share
    if rank == 0:
        print(f"base model: {count_parameters(unet) / 1e6:.2f}M parameters, latents {tuple(z0.shape)}")

    def loss_fn(net, step, gen):
        idx = shard[torch.randint(len(shard), (local_batch(cfg.batch_size),), generator=gen, device=device)]
        cond = drop_labels(label[idx], K, cfg.p_uncond, gen)
        return diffusion_loss(net, scheduler, z0[idx], cond, gen)

    stats = train(unet, loss_fn, cfg, out, sample_fn=lambda model, run: grids(pipe, run, K), device=device, desc="base")
    if rank == 0 and stats["img_per_s"] == stats["img_per_s"]:   # trained now (not NaN): record it
        plot_loss(out)
        print(f"base: {stats['step']} steps, loss {stats['loss']:.4f}, {stats['seconds']:.0f}s, "
              f"{stats['img_per_s']:.0f} img/s -> {out}")
    pipe.run_dir = out
    unet.eval()
    return pipe


def load_pipeline(run_dir, device="cpu") -> Pipeline:
    """A trained base model (any run dir written by ddpm.py) with its autoencoder."""
    run_dir = Path(run_dir)
    if not (run_dir / "ckpt.pt").exists():
        raise FileNotFoundError(f"no checkpoint in {run_dir}; train one with python ddpm.py --dataset ...")
    state = load_checkpoint(run_dir / "ckpt.pt", map_location=device)
    cfg = from_fields(DiffusionConfig, state["config"])
    vae = vae_lib.load_vae(run_dir.parent / cfg.vae, device)
    K = state["ema_model"]["class_emb.weight"].shape[0] - 1
    unet = build_unet(cfg, K, vae.decoder[0].in_channels).to(device)
    unet.load_state_dict(state["ema_model"])
    pipe = Pipeline(cfg, vae, unet, cfg.preset, device)
    pipe.run_dir = run_dir
    return pipe


def main():
    cfg, args = parse_config(DiffusionConfig, {}, description="train the base latent diffusion model")
    cfg = base_config(data_config(cfg), args.preset, **explicit_flags(DiffusionConfig, args))
    pipe = ensure_base(cfg, args.preset, args.runs, args.device, args.fresh)
    print(f"samples: {pipe.run_dir / 'samples.png'} (one row per class), {pipe.run_dir / 'samples_uncond.png'}")


if __name__ == "__main__":
    main_guard(main)
