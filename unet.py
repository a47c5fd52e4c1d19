"""The latent denoiser ε_θ(z_t, t, c): a small UNet (Ho et al. 2020; Dhariwal & Nichol 2021).

    emb   = MLP(sinusoid(t)) + E_class[c]            c ∈ {0..K-1} or K = the null class (∅)
    down  : per level, ResBlocks(emb) [+ self-attention at the lowest resolution], then 2x down
    mid   : ResBlock, self-attention, ResBlock
    up    : per level, ResBlocks on [h, skip] (concatenated), then 2x up
    out   : GroupNorm -> SiLU -> conv, zero-initialised, so an untrained model predicts 0

It returns a tensor the shape of z_t: ε̂ for prediction_type "epsilon", v̂ for "v_prediction".
Class conditioning has a null class K: training drops the label to ∅ with probability 10% (ddpm.py),
so one model samples unconditionally (c = ∅) and per class with classifier-free guidance,
    ε̂_cfg = ε̂(z_t, t, ∅) + s · (ε̂(z_t, t, c) − ε̂(z_t, t, ∅)).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps t [B] -> [B, dim] (Vaswani et al. 2017), in dtype."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=dtype) / half)
    args = t.to(dtype)[:, None] * freqs[None]                            # [B, dim/2]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)          # [B, dim]


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)                                 # each block starts as identity
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):                                            # x [B, C, h, w], emb [B, E]
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the h·w positions, with separate q/k/v/out projections
    (separate so DDM's LoRA can wrap q and v, as the paper does on Stable Diffusion)."""

    def __init__(self, channels: int, groups: int, head_dim: int = 32):
        super().__init__()
        self.heads = max(1, channels // head_dim)
        self.norm = nn.GroupNorm(groups, channels)
        self.q, self.k, self.v = (nn.Linear(channels, channels) for _ in range(3))
        self.out = nn.Linear(channels, channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x, emb=None):                                       # x [B, C, h, w]
        b, c, h, w = x.shape
        tokens = rearrange(self.norm(x), "b c h w -> b (h w) c")          # [B, hw, C]
        q, k, v = (rearrange(f(tokens), "b n (heads d) -> b heads n d", heads=self.heads)
                   for f in (self.q, self.k, self.v))                     # [B, heads, hw, d]
        a = F.scaled_dot_product_attention(q, k, v)
        a = self.out(rearrange(a, "b heads n d -> b n (heads d)"))        # [B, hw, C]
        return x + rearrange(a, "b (h w) c -> b c h w", h=h, w=w)


class UNet(nn.Module):
    def __init__(self, in_channels=4, channels=(128, 256), num_res_blocks=2, num_classes=10,
                 groups=32, dropout=0.0, attention=True):
        super().__init__()
        self.num_classes = num_classes                                    # index num_classes = ∅
        c0, emb_dim = channels[0], 4 * channels[0]
        self.time_mlp = nn.Sequential(nn.Linear(c0, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim)
        self.conv_in = nn.Conv2d(in_channels, c0, 3, padding=1)
        last = len(channels) - 1

        def block(c_in, c_out, level):
            layers = [ResBlock(c_in, c_out, emb_dim, groups, dropout)]
            if attention and level == last:                               # attention at the lowest resolution
                layers.append(Attention(c_out, groups))
            return nn.ModuleList(layers)

        self.down, skips, c = nn.ModuleList(), [c0], c0
        for level, c_out in enumerate(channels):
            for _ in range(num_res_blocks):
                self.down.append(block(c, c_out, level))
                c = c_out
                skips.append(c)
            if level < last:
                self.down.append(nn.ModuleList([nn.Conv2d(c, c, 3, stride=2, padding=1)]))
                skips.append(c)
        self.mid = nn.ModuleList([ResBlock(c, c, emb_dim, groups, dropout), Attention(c, groups),
                                  ResBlock(c, c, emb_dim, groups, dropout)])
        self.up = nn.ModuleList()
        for level, c_out in reversed(list(enumerate(channels))):
            for _ in range(num_res_blocks + 1):
                self.up.append(block(c + skips.pop(), c_out, level))
                c = c_out
            if level > 0:
                self.up.append(nn.ModuleList([nn.Upsample(scale_factor=2, mode="nearest"),
                                              nn.Conv2d(c, c, 3, padding=1)]))
        self.out = nn.Sequential(nn.GroupNorm(groups, c), nn.SiLU(), nn.Conv2d(c, in_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)                               # start from ε̂ = 0
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, z, t, cond=None):
        """z [B, c, h, w], t [B] int in [0, T-1], cond [B] int (None or num_classes = ∅)."""
        if cond is None:
            cond = torch.full((z.shape[0],), self.num_classes, device=z.device, dtype=torch.long)
        sinusoid = timestep_embedding(t, self.conv_in.out_channels, dtype=self.time_mlp[0].weight.dtype)  # the MLP's
        emb = self.time_mlp(sinusoid) + self.class_emb(cond)                                               # [B, E]
        h = self.conv_in(z)
        hs = [h]
        for layers in self.down:
            h = run(layers, h, emb)
            hs.append(h)
        h = run(self.mid, h, emb)
        for layers in self.up:
            if isinstance(layers[0], ResBlock):                           # a block takes a skip
                h = torch.cat([h, hs.pop()], dim=1)
            h = run(layers, h, emb)
        return self.out(h)                                                # [B, c, h, w]


def run(layers, h, emb):
    for layer in layers:
        h = layer(h, emb) if isinstance(layer, (ResBlock, Attention)) else layer(h)
    return h


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
