"""KL autoencoder: the first stage of latent diffusion (Rombach et al. 2022, "LDM").

    encoder E:  x [B, 3, H, W] in [-1, 1]  ->  (μ, log σ²) [B, 2·c, H/f, W/f]
    posterior   q(z | x) = N(μ, σ²)        (DiagonalGaussian: .sample(), .mode() = μ, .kl())
    decoder D:  z [B, c, H/f, W/f]          ->  x̂ [B, 3, H, W]

    loss = mean |x − x̂|  +  mean (x − x̂)²  +  kl_weight · Σ KL(q(z|x) ‖ N(0, I)) / (3·H·W)

The KL is summed over latent elements and divided by the pixel count: that is LDM's ratio between
its summed reconstruction and summed KL, so LDM's kl_weight = 1e-6 means the same here. No LPIPS or
GAN term (both need downloaded weights and add instability at this scale). LDM's pixel term is L1
alone; we add the squared error because on mostly-black MNIST the L1 (median-seeking) autoencoder
stalls at an all-black reconstruction for hundreds of steps, while the squared error learns the strokes.
f = 2^(levels − 1): 32 px -> 4×8×8 and 64 px -> 4×16×16 with the default three levels.

Latent scale. The diffusion model wants latents of unit variance, so after training we measure
    scale = 1 / std(μ over the training images)
store it in the checkpoint and apply it in exactly one place (`encode_dataset` multiplies, and
`Autoencoder.decode_latents` divides). Stable Diffusion's 0.18215 is that number for its own VAE.

The autoencoder is a bias-neutral first stage, like SD's VAE trained on other data: it trains on
the balanced (bias 0.5) version of the training set, so every bias setting shares one autoencoder
and only the cached latents differ. `python vae.py --dataset cmnist` trains it (or reuses it),
writes recon.png (top: inputs, bottom: reconstructions) and caches the latents.
"""
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.utils import save_image

import data
import datafiles
from config import (ConfigError, TrainConfig, check_train_config, config_hash, explicit_flags, from_fields, int_list,
                    main_guard, parse_config)
from train import load_checkpoint, local_batch, seed_everything, train


@dataclass
class VAEConfig(data.DataConfig, TrainConfig):
    channels: str = "64,128,128"   # width per resolution level; f = 2^(levels-1)
    latent_channels: int = 4
    kl_weight: float = 1e-6        # LDM's weight, see the module docstring for the reduction


PRESETS = {
    "tiny": dict(channels="16,32,32", steps=300, batch_size=32, lr=1e-3, n_train=2000, ckpt_every=300, warmup=20),
    "small": dict(channels="64,128,128", steps=2000, batch_size=256, lr=5e-4, ckpt_every=1000),
    "full": dict(channels="128,256,256", steps=15000, batch_size=128, lr=2e-4, ckpt_every=2500),
}
GROUPS = 8   # GroupNorm groups (channels must be divisible by it)
LATENT_KEYS = {"z0", "group", "label", "num_classes"}   # what encode_dataset caches


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, plus a skip (1x1 conv when the width changes)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.GroupNorm(GROUPS, c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1),
            nn.GroupNorm(GROUPS, c_out), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):
        return self.skip(x) + self.block(x)


class DiagonalGaussian:
    """q(z|x) = N(mean, exp(logvar)) per latent element."""

    def __init__(self, moments):                              # [B, 2c, h, w]
        self.mean, logvar = moments.float().chunk(2, dim=1)   # [B, c, h, w] each
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator=None):
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device)
        return self.mean + self.std * noise

    def mode(self):
        return self.mean

    def kl(self):
        """KL(q ‖ N(0, I)) summed over latent elements: [B]."""
        return 0.5 * (self.mean ** 2 + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class Autoencoder(nn.Module):
    def __init__(self, channels=(64, 128, 128), latent_channels=4, kl_weight=1e-6):
        super().__init__()
        self.kl_weight = kl_weight
        ch = list(channels)
        # Encoder: conv -> [ResBlock, downsample] per level -> ResBlock -> (μ, log σ²)
        enc = [nn.Conv2d(3, ch[0], 3, padding=1)]
        for i, c in enumerate(ch):
            enc.append(ResBlock(ch[max(i - 1, 0)], c))
            if i < len(ch) - 1:
                enc.append(nn.Conv2d(c, c, 3, stride=2, padding=1))   # H -> H/2
        enc += [ResBlock(ch[-1], ch[-1]), nn.GroupNorm(GROUPS, ch[-1]), nn.SiLU(),
                nn.Conv2d(ch[-1], 2 * latent_channels, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)
        # Decoder mirrors it: latent -> ResBlock -> [ResBlock, upsample] per level -> RGB
        dec = [nn.Conv2d(latent_channels, ch[-1], 3, padding=1), ResBlock(ch[-1], ch[-1])]
        rev = ch[::-1]
        for i, c in enumerate(rev):
            dec.append(ResBlock(rev[max(i - 1, 0)], c))
            if i < len(rev) - 1:
                dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)]
        dec += [nn.GroupNorm(GROUPS, ch[0]), nn.SiLU(), nn.Conv2d(ch[0], 3, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)
        self.register_buffer("scale", torch.ones(()))    # latent scale factor, measured after training

    def encode(self, x) -> DiagonalGaussian:              # x [B, 3, H, W] in [-1, 1]
        return DiagonalGaussian(self.encoder(x))

    def decode(self, z):                                  # z [B, c, h, w] (unscaled)
        return self.decoder(z)

    def decode_latents(self, z0) -> torch.Tensor:
        """Diffusion latents (scaled) -> uint8 images [B, 3, H, W]."""
        x = self.decode(z0 / self.scale).float()
        return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

    def forward(self, x, generator=None):
        """The training loss of a batch x [B, 3, H, W] in [-1, 1] (a scalar)."""
        posterior = self.encode(x)
        x_hat = self.decode(posterior.sample(generator))
        pixels = x[0].numel()
        x_hat, x = x_hat.float(), x.float()
        return F.l1_loss(x_hat, x) + F.mse_loss(x_hat, x) + self.kl_weight * posterior.kl().mean() / pixels


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float [-1, 1]."""
    return images.float() / 127.5 - 1.0


def vae_config(data_cfg: data.DataConfig, preset: str, **overrides) -> VAEConfig:
    """The autoencoder for a dataset: bias-neutral (trained on the balanced split)."""
    fields = {**asdict(data_cfg), **PRESETS[preset], **overrides}
    fields.update(bias=0.5, cell_ratio="", spurious=0.0)
    return from_fields(VAEConfig, fields)


def check_vae_config(cfg: VAEConfig):
    uneven = [c for c in int_list("channels", cfg.channels) if c % GROUPS]
    if uneven:
        raise ConfigError(f"--channels {cfg.channels}: {uneven[0]} is not divisible by {GROUPS} (GroupNorm groups)")
    if cfg.latent_channels < 1:
        raise ConfigError(f"--latent-channels {cfg.latent_channels} must be >= 1")
    if cfg.kl_weight < 0:
        raise ConfigError(f"--kl-weight {cfg.kl_weight} must be >= 0")


def build(cfg: VAEConfig) -> Autoencoder:
    return Autoencoder(int_list("channels", cfg.channels), cfg.latent_channels, cfg.kl_weight)


def train_vae(cfg: VAEConfig, out: Path, device: str) -> Autoencoder:
    """Train (or resume / reuse) the autoencoder in `out`; measure and store the latent scale."""
    check_vae_config(cfg)
    images = data.load(cfg, "train").images.to(device)    # uint8 [N, 3, H, W], resident on device
    seed_everything(cfg.seed)                             # same seed ⇒ same initial weights
    model = build(cfg).to(device)
    fixed = images[:32]

    def loss_fn(net, step, gen):
        idx = torch.randint(len(images), (local_batch(cfg.batch_size),), generator=gen, device=device)
        return net(to_unit(images[idx]), gen)        # the posterior noise too: a resume is exact

    def recon_grid(m, run):
        with torch.no_grad():
            x = to_unit(fixed)
            x_hat = m.decode(m.encode(x).mode()).clamp(-1, 1)
        save_image(torch.cat([x, x_hat]) * 0.5 + 0.5, run / "recon.png", nrow=16)

    stats = train(model, loss_fn, cfg, out, sample_fn=recon_grid, device=device, desc="vae")
    state = load_checkpoint(out / "ckpt.pt")
    if "scale" not in state:  # measure once, store beside the weights
        model.eval()
        mu = encode_images(model, images, device)
        scale = 1.0 / mu.float().std()
        state["scale"] = scale.cpu()
        datafiles.save_cache(state, out / "ckpt.pt")
        print(f"vae: latent std {mu.std():.3f} -> scale factor {scale:.4f}; "
              f"loss {stats['loss']:.4f}; {stats['img_per_s']:.0f} img/s")
    model.scale.fill_(float(state["scale"]))
    return model.eval()


@torch.no_grad()
def encode_images(model: Autoencoder, images: torch.Tensor, device, batch=1000) -> torch.Tensor:
    """Posterior means of uint8 images (unscaled): [N, c, h, w]."""
    return torch.cat([model.encode(to_unit(images[i:i + batch].to(device))).mode()
                      for i in range(0, len(images), batch)])


def load_vae(out: Path, device="cpu") -> Autoencoder:
    state = load_checkpoint(Path(out) / "ckpt.pt", map_location=device)
    if "scale" not in state:
        raise ConfigError(f"autoencoder {out} is unfinished; rerun vae.py to finish it")
    model = build(from_fields(VAEConfig, state["config"]))
    model.load_state_dict(state["ema_model"])
    model.scale.fill_(float(state["scale"]))
    return model.to(device).eval()


def ensure_vae(data_cfg: data.DataConfig, preset: str, runs: str, device: str, fresh=False, **overrides):
    """Find the autoencoder for this dataset and preset by its config hash, or train it."""
    data.check_config(data_cfg)                           # fail on a bad flag before training anything
    cfg = vae_config(data_cfg, preset, **overrides)
    check_train_config(cfg)
    check_vae_config(cfg)
    out = Path(runs) / cfg.dataset / f"vae-{config_hash(cfg)}"
    if fresh and (out / "ckpt.pt").exists():
        (out / "ckpt.pt").unlink()
    if (out / "ckpt.pt").exists() and "scale" in load_checkpoint(out / "ckpt.pt", cfg):
        return load_vae(out, device), out
    return train_vae(cfg, out, device), out


def encode_dataset(vae: Autoencoder, vae_dir: Path, data_cfg: data.DataConfig, device, split="train") -> dict:
    """Latents z0 = scale · μ(x) of a dataset split, cached in the autoencoder's run dir.

    Returns {"z0": [N, c, h, w], "group": [N], "label": [N], "num_classes": int} on `device`."""
    cache = Path(vae_dir) / f"latents-{split}-{config_hash(data_cfg)}.pt"
    d = datafiles.load_cache(cache, lambda d: isinstance(d, dict) and LATENT_KEYS <= d.keys(), device)
    if d is None:                                                   # absent, or unreadable: rebuilt
        s = data.load(data_cfg, split)
        z0 = encode_images(vae, s.images, device) * vae.scale        # the one place scale is applied
        d = {"z0": z0.float(), "group": s.group, "label": s.label, "num_classes": s.num_classes}
        datafiles.save_cache({k: (v.cpu() if torch.is_tensor(v) else v) for k, v in d.items()}, cache)
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in d.items()}


def main():
    cfg, args = parse_config(VAEConfig, {}, description="train the KL autoencoder and cache latents")
    data_cfg = from_fields(data.DataConfig, asdict(cfg))
    overrides = {k: v for k, v in explicit_flags(VAEConfig, args).items() if k not in asdict(data_cfg)}
    vae, out = ensure_vae(data_cfg, args.preset, args.runs, args.device, args.fresh, **overrides)
    z = encode_dataset(vae, out, data_cfg, args.device)["z0"]
    print(f"latents {tuple(z.shape)} (std {z.std():.3f}) cached in {out}; reconstructions: {out / 'recon.png'}")


if __name__ == "__main__":
    main_guard(main)
