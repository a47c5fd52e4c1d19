"""Throughput of the latent UNet: training and sampling speed, FLOPs and MFU, optionally beside
diffusers' UNet2DModel built to the same configuration.

Two fixed configs, the `small` preset's UNet on random latents resident on the device:

    cmnist   latents 4×8×8     UNet channels 128,256       10 classes   VAE decodes to 32 px
    celeba   latents 4×16×16   UNet channels 128,256,256    2 classes   VAE decodes to 64 px

Each figure is the median of several timed windows after warm-up, with torch.cuda.synchronize()
closing every window:

    train img/s     = B / (one train() step: bf16 autocast diffusion loss, backward, grad clip,
                           fused AdamW, LR schedule, EMA with torch._foreach_* ops;
                           --cuda-graph: that step captured once and replayed, cuda_graph.GraphStep)
    sample img/s    = n / (n noises -> n uint8 images: DDIM-50 or DDPM-1000, then the VAE decode;
                           --cuda-graph: the denoiser's forward captured once, cuda_graph.GraphDenoiser)
    FLOPs / image   = torch.utils.flop_counter.FlopCounterMode on a small batch (attention through
                      its math kernel, so every backend's attention is counted the same way)
    MFU             = img/s · FLOPs/image / (the device's dense bf16 peak; null when unknown)

The VAE is freshly initialised: its weights do not change the speed. `--compare diffusers` times
diffusers' UNet2DModel (same resolution, widths, blocks, attention level, class embedding and norm
groups; the parameter counts are printed side by side) with the identical batch, precision and
optimiser. diffusers is a benchmark-only dependency: without it the comparison is skipped.

The JSON (rewritten after each config, so a cut-off run keeps what it measured):

    {device, device_slug, peak_bf16_dense_flops, torch, diffusers (version or null), vae, options,
     configs: {cmnist | celeba: {config, fairdiff, diffusers (with --compare):
        {params, train_img_per_s, train_ms_per_step, train_peak_mem_gib, train_loss,
         train_gflop_per_img, train_mfu, forward_gflop_per_img, decode_gflop_per_img,
         sample_ddim | sample_ddpm: {steps, images, seconds, img_per_s, gflop_per_img, mfu, peak_mem_gib}}}}}

    python bench.py                                   # -> bench/<device>.json and a table
    python bench.py --compare diffusers --compile --channels-last
    python bench.py --compare diffusers --cuda-graph --no-sampling     # the training step only
    python bench.py --quick --device cpu --out /tmp/bench.json   # tiny sizes: a smoke test
"""
import argparse
import json
import math
import re
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import data
import ddpm
import vae as vae_lib
from config import ConfigError, device_name, main_guard
from cuda_graph import GraphDenoiser
from train import EMA, gradient_clip, make_step, optimizer
from unet import count_parameters

DATASETS = {"cmnist": dict(num_classes=10, latent=(4, 8, 8)),      # class = digit
            "celeba": dict(num_classes=2, latent=(4, 16, 16))}     # class = Smiling
PEAK_BF16_DENSE = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12)]  # NVIDIA datasheets, no sparsity
N_LATENTS = 20_000          # random "training set" resident on the device
FLOP_BATCH = 2              # FLOPs are counted on this many images and divided
FULL = dict(preset="small", train_warmup=10, train_iters=20, windows=5, samples=1000, ddim_steps=50,
            ddpm_steps=1000, sample_windows=3)
QUICK = dict(preset="tiny", train_warmup=1, train_iters=2, windows=2, samples=8, ddim_steps=4,
             ddpm_steps=8, sample_windows=1)
QUICK_BATCH = 8
VAE_NOTE = "freshly initialised small VAE (tiny with --quick): weights do not change the speed"


# ------------------------------------------------------------------------------------ timing
def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def median_seconds(fn, device, warmup: int, windows: int, iters: int) -> float:
    """Median over `windows` of the mean time of one call (each window `iters` calls)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(windows):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync(device)
        times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times)


def count_flops(fn) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def peak_memory(device):
    """GiB allocated at most since the last reset (None on CPU)."""
    return torch.cuda.max_memory_allocated() / 2 ** 30 if str(device).startswith("cuda") else None


def reset_peak_memory(device):
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak_bf16(name: str):
    """The dense bf16 FLOP/s of a known GPU (the first matching name), else None."""
    return next((peak for key, peak in PEAK_BF16_DENSE if key in name), None)


def device_info(device) -> dict:
    name = device_name(device)
    return {"device": name, "device_slug": re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"),
            "peak_bf16_dense_flops": peak_bf16(name)}


# ------------------------------------------------------------------------------------ models
class DiffusersEps(nn.Module):
    """diffusers' UNet2DModel behind our call signature model(z_t, t, cond) -> ε̂."""

    def __init__(self, unet, num_classes: int):
        super().__init__()
        self.unet, self.num_classes = unet, num_classes                   # index num_classes = ∅

    def forward(self, z, t, cond=None):
        if cond is None:
            cond = torch.full((z.shape[0],), self.num_classes, device=z.device, dtype=torch.long)
        return self.unet(z, t, class_labels=cond, return_dict=False)[0]


def diffusers_unet(cfg: ddpm.DiffusionConfig, num_classes: int, latent) -> DiffusersEps:
    """UNet2DModel matched to unet.UNet: per level `num_res_blocks` ResBlocks (+1 on the way up),
    attention only at the lowest resolution and in the middle, 4·c0 embedding, a class table with
    the null class, head dim 32, the same GroupNorm groups."""
    from diffusers import UNet2DModel
    channels = tuple(int(c) for c in cfg.channels.split(","))
    plain = len(channels) - 1
    unet = UNet2DModel(sample_size=latent[1], in_channels=latent[0], out_channels=latent[0],
                       block_out_channels=channels, layers_per_block=cfg.num_res_blocks,
                       down_block_types=("DownBlock2D",) * plain + ("AttnDownBlock2D",),
                       up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * plain,
                       attention_head_dim=32, norm_num_groups=cfg.norm_groups, dropout=cfg.dropout,
                       num_class_embeds=num_classes + 1)
    return DiffusersEps(unet, num_classes)


# ---------------------------------------------------------------------------------- one model
def make_train_step(model, cfg, z0, label, num_classes, device, compile: bool, graph=False):
    """A closure doing exactly one step of train.train()'s inner loop on the resident latents
    (graph: the step captured in a CUDA graph, as train() does with --cuda-graph true)."""
    cuda = str(device).startswith("cuda")
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = optimizer(params, cfg, cuda, graph)
    ema = EMA(params, cfg.ema_decay)
    scheduler = ddpm.build_scheduler(cfg, "ddpm")
    gen = torch.Generator(device).manual_seed(cfg.seed)
    net = torch.compile(model) if compile else model
    finite = torch.ones((), dtype=torch.bool, device=device)
    loss_sum = torch.zeros((), device=device)
    step = 0

    def loss_fn(net, step, gen):  # the base model's loss, as in ddpm.ensure_base
        idx = torch.randint(len(z0), (cfg.batch_size,), generator=gen, device=device)
        cond = ddpm.drop_labels(label[idx], num_classes, cfg.p_uncond, gen)
        return ddpm.diffusion_loss(net, scheduler, z0[idx], cond, gen)

    take_step = make_step(net, loss_fn, gen, opt, sched, ema, params, gradient_clip(cfg), cuda, graph)

    def one_step():
        nonlocal step, finite
        loss = take_step(step)
        finite &= torch.isfinite(loss)
        loss_sum.add_(loss.float())
        step += 1

    def mean_loss() -> float:
        if not finite:
            raise FloatingPointError("non-finite loss while benchmarking")
        return loss_sum.item() / max(step, 1)
    return one_step, mean_loss, scheduler


def bench_model(model, cfg, vae, num_classes, plan, args) -> dict:
    """Training and sampling figures of one denoiser (ours or diffusers')."""
    device = args.device
    cuda = str(device).startswith("cuda")
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=fmt).train()
    latent = DATASETS[cfg.dataset]["latent"]
    gen = torch.Generator(device).manual_seed(0)
    z0 = torch.randn((N_LATENTS, *latent), generator=gen, device=device).contiguous(memory_format=fmt)  # [N, 4, h, w]
    label = torch.randint(num_classes, (N_LATENTS,), generator=gen, device=device)                     # [N]
    step, mean_loss, scheduler = make_train_step(model, cfg, z0, label, num_classes, device, args.compile,
                                                 args.cuda_graph)

    def train_flops():
        with torch.autocast("cuda", torch.bfloat16, enabled=cuda):
            loss = ddpm.diffusion_loss(model, scheduler, z0[:FLOP_BATCH], label[:FLOP_BATCH], gen)
        loss.backward()
    flops_train = count_flops(train_flops) / FLOP_BATCH
    model.zero_grad(set_to_none=True)

    reset_peak_memory(device)
    s_step = median_seconds(step, device, plan["train_warmup"], plan["windows"], plan["train_iters"])
    out = {"params": count_parameters(model), "train_img_per_s": cfg.batch_size / s_step,
           "train_ms_per_step": 1e3 * s_step, "train_peak_mem_gib": peak_memory(device),
           "train_loss": mean_loss(), "train_gflop_per_img": flops_train / 1e9,
           "train_mfu": mfu(cfg.batch_size / s_step * flops_train, args.peak)}

    if not args.sampling:
        return out
    net = torch.compile(model) if args.compile else model
    pipe = ddpm.Pipeline(cfg, vae, net, plan["preset"], device)            # puts the model in eval mode
    if pipe.latent_shape != latent:
        raise ValueError(f"the {cfg.dataset} autoencoder gives latents {pipe.latent_shape}, not {latent}")
    n = plan["samples"]
    with torch.inference_mode():
        z = torch.randn((FLOP_BATCH, *latent), device=device)
        t = torch.full((FLOP_BATCH,), scheduler.num_train_timesteps - 1, device=device)
        flops_forward = count_flops(lambda: model(z, t)) / FLOP_BATCH
        flops_decode = count_flops(lambda: vae.decode_latents(z)) / FLOP_BATCH
    out["forward_gflop_per_img"] = flops_forward / 1e9
    out["decode_gflop_per_img"] = flops_decode / 1e9
    denoiser = GraphDenoiser(pipe.unet) if args.cuda_graph else pipe.unet   # captured in the first warm-up
    sample = {}
    for sampler in ("ddim", "ddpm"):
        steps = plan[f"{sampler}_steps"]

        def generate():
            return pipe.sample(n, None, seed=0, steps=steps, sampler=sampler, batch_size=n, model=denoiser)
        reset_peak_memory(device)
        warmup = 1 if sampler == "ddim" else 0                         # DDIM's run warms DDPM's shapes
        seconds = median_seconds(generate, device, warmup, plan["sample_windows"], 1)
        flops = steps * flops_forward + flops_decode
        sample[sampler] = {"steps": steps, "images": n, "seconds": seconds, "img_per_s": n / seconds,
                           "gflop_per_img": flops / 1e9, "mfu": mfu(n / seconds * flops, args.peak),
                           "peak_mem_gib": peak_memory(device)}
    out["sample_ddim"], out["sample_ddpm"] = sample["ddim"], sample["ddpm"]
    return out


def mfu(flops_per_s: float, peak):
    return None if peak is None else flops_per_s / peak


# ---------------------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description="benchmark training and sampling throughput")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=None, help="training batch (default 256; 8 with --quick)")
    p.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated: cmnist,celeba")
    p.add_argument("--compile", action="store_true", help="torch.compile the models (training and sampling)")
    p.add_argument("--channels-last", action="store_true", help="channels_last weights and latents")
    p.add_argument("--cuda-graph", action="store_true", help="the training step and the sampler's denoiser "
                   "captured in CUDA graphs")
    p.add_argument("--no-sampling", dest="sampling", action="store_false", help="time training only")
    p.add_argument("--compare", choices=["diffusers"], default=None, help="also time diffusers' UNet2DModel")
    p.add_argument("--quick", action="store_true", help="tiny models and a few iterations (a smoke test)")
    p.add_argument("--out", default=None, help="JSON path (default bench/<device>[-compile][-channels-last][-quick].json)")
    args = p.parse_args(argv)
    if args.batch_size is None:
        args.batch_size = QUICK_BATCH if args.quick else 256
    if args.batch_size <= 0:
        raise ConfigError(f"--batch-size {args.batch_size} must be > 0")
    bad = [d for d in args.datasets.split(",") if d not in DATASETS]
    if bad:
        raise ConfigError(f"unknown dataset {bad[0]!r} in --datasets; choose from {', '.join(DATASETS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device} but CUDA is not available; use --device cpu")
    if args.cuda_graph and not args.device.startswith("cuda"):
        raise ConfigError(f"--cuda-graph needs a CUDA device, not --device {args.device}")
    if args.cuda_graph and args.compile:
        raise ConfigError("--cuda-graph and --compile: choose one")
    return args


def diffusers_version():
    try:
        import diffusers
    except ImportError:
        print("diffusers is not installed: skipping --compare diffusers "
              "(pip install diffusers; it is a benchmark-only dependency)")
        return None
    return diffusers.__version__


def main(argv=None):
    args = parse_args(argv)
    plan = dict(FULL, **(QUICK if args.quick else {}), batch_size=args.batch_size)
    info = device_info(args.device)
    args.peak = info["peak_bf16_dense_flops"]
    compare = diffusers_version() if args.compare == "diffusers" else None
    report = {**info, "torch": torch.__version__, "diffusers": compare, "vae": VAE_NOTE,
              "options": {"batch_size": plan["batch_size"], "compile": args.compile, "cuda_graph": args.cuda_graph,
                          "channels_last": args.channels_last, "quick": args.quick,
                          "precision": "bf16 autocast" if args.device.startswith("cuda") else "fp32",
                          "optimizer": "AdamW (fused on CUDA), grad clip, EMA"},
              "configs": {}}
    flags = [name for name, on in (("compile", args.compile), ("cuda-graph", args.cuda_graph),
                                   ("channels-last", args.channels_last), ("quick", args.quick)) if on]
    out = Path(args.out or f"bench/{'-'.join([info['device_slug'], *flags])}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"{info['device']}, torch {torch.__version__}, batch {plan['batch_size']}"
          + (f", diffusers {compare}" if compare else ""))
    for dataset in args.datasets.split(","):
        data_cfg = data.DataConfig(dataset=dataset)
        cfg = ddpm.base_config(data_cfg, plan["preset"], batch_size=plan["batch_size"])
        K = DATASETS[dataset]["num_classes"]
        vae = vae_lib.build(vae_lib.vae_config(data_cfg, plan["preset"])).to(args.device).eval()
        entry = {"config": {"latent": list(DATASETS[dataset]["latent"]), "channels": cfg.channels,
                            "num_res_blocks": cfg.num_res_blocks, "norm_groups": cfg.norm_groups,
                            "num_classes": K, "preset": plan["preset"], "vae_channels":
                            vae_lib.vae_config(data_cfg, plan["preset"]).channels}}
        torch.manual_seed(0)
        entry["fairdiff"] = bench_model(ddpm.build_unet(cfg, K), cfg, vae, K, plan, args)
        if compare:
            torch.manual_seed(0)
            theirs = diffusers_unet(cfg, K, DATASETS[dataset]["latent"])
            ratio = count_parameters(theirs) / entry["fairdiff"]["params"]
            print(f"{dataset}: parameters fairdiff {entry['fairdiff']['params']:,}, "
                  f"diffusers {count_parameters(theirs):,} (ratio {ratio:.3f})")
            if abs(ratio - 1) > 0.1:
                raise ValueError(f"diffusers' UNet has {ratio:.2f}x our parameters: the configs do not match")
            entry["diffusers"] = bench_model(theirs, cfg, vae, K, plan, args)
        report["configs"][dataset] = entry
        for name in ("fairdiff", "diffusers")[:1 + bool(compare)]:
            r = entry[name]
            sampled = (f", DDIM {r['sample_ddim']['img_per_s']:.1f} img/s, DDPM {r['sample_ddpm']['img_per_s']:.2f} "
                       f"img/s" if "sample_ddim" in r else "")
            print(f"  {dataset} {name}: train {r['train_img_per_s']:.0f} img/s{sampled}")
        out.write_text(json.dumps(report, indent=2) + "\n")         # after each config: partial runs count
    print(format_table(report))
    print(f"-> {out}")
    return report


def format_table(report) -> str:
    def num(x, f):
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, f)
    head = (f"{'config':8} {'model':9} {'params':>8} {'train img/s':>12} {'ms/step':>8} {'peak GiB':>9} "
            f"{'GFLOP/img':>10} {'MFU':>6} {'DDIM img/s':>11} {'DDPM img/s':>11} {'DDIM MFU':>9}")
    rows = [head, "-" * len(head)]
    for dataset, entry in report["configs"].items():
        for name in ("fairdiff", "diffusers"):
            r = entry.get(name)
            if r is None:
                continue
            ddim, ddpm_ = r.get("sample_ddim", {}), r.get("sample_ddpm", {})   # absent with --no-sampling
            rows.append(f"{dataset:8} {name:9} {r['params'] / 1e6:>7.2f}M {num(r['train_img_per_s'], '12.0f')} "
                        f"{num(r['train_ms_per_step'], '8.2f')} {num(r['train_peak_mem_gib'], '9.2f')} "
                        f"{num(r['train_gflop_per_img'], '10.2f')} {num(r['train_mfu'], '6.1%')} "
                        f"{num(ddim.get('img_per_s'), '11.1f')} {num(ddpm_.get('img_per_s'), '11.2f')} "
                        f"{num(ddim.get('mfu'), '9.1%')}")
    steps = next(iter(report["configs"].values()))["fairdiff"]
    if "sample_ddim" in steps:
        rows.append(f"sampling: {steps['sample_ddim']['images']} images, DDIM-{steps['sample_ddim']['steps']} / "
                    f"DDPM-{steps['sample_ddpm']['steps']}, VAE decode included ({report['vae']})")
    return "\n".join(rows)


if __name__ == "__main__":
    main_guard(main)
