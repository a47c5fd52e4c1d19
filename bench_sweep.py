"""Sweep throughput: N arms of one fine-tune trained as one stacked model, against the alternatives.

    python bench_sweep.py --arms 6,12,30 --compare diffusers     # -> bench/<device>-sweep.json

Every arm is a fine-tune of the small preset's cmnist UNet (latents 4×8×8, random, resident on the
device) with the base model's loss, batch B per arm, bf16 autocast, AdamW, EMA and gradient
clipping, its step captured as a CUDA graph. Four ways to train N arms, in total images per second
over all arms (and MFU = img/s · training FLOPs per image / the device's dense bf16 peak):

    stacked      one step of stack.Stacked over the N arms (vmap; per-arm clipping), one CUDA graph
    sequential   N one-arm steps one after another, each its own CUDA graph
    processes    N Python processes side by side on the GPU, each one arm's captured step (what a
                 user does by hand); timed from a common start to the last one's end
    diffusers    (--compare diffusers) diffusers' UNet2DModel, one model at its best setting:
                 captured, batch `--diffusers-batch` (1024)

`--finetune lora` stacks LoRA arms (the prior protocol's): the frozen convolutions are shared, so
they run as one plain convolution over N·B images. FLOPs are counted on the full network for both.

`--sampling` times what follows the fine-tunes instead: N stacked LoRA arms (random weights) sampled
with DDIM under CFG, every arm's latents in one pass of stack.LATENTS_PER_PASS latents in all, as
ddm_report.sample_arms does, in the float32 (TF32) the stack runs in, in float32 with the stack's
forward captured as a CUDA graph (cuda_graph.GraphDenoiser, captured in the warm-up run) and in a
bfloat16 copy of the same stack, from the same noise:

    latents/s            = N · n / (one DDIM run of `--sample-steps` steps; 2 passes a step under CFG)
    <variant>_deviation  = RMS(z_variant − z_fp32) / std(z_fp32) of the final latents
"""
import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

import bench
import data
import ddm
import ddpm
from cuda_graph import GraphDenoiser
from stack import Stacked, arm_batch
from config import ConfigError, main_guard
from train import EMA, gradient_clip, make_step, optimizer

K = bench.DATASETS["cmnist"]["num_classes"]
LATENT = bench.DATASETS["cmnist"]["latent"]


def setting(batch: int) -> ddpm.DiffusionConfig:
    return ddpm.base_config(data.DataConfig(dataset="cmnist"), "small", batch_size=batch)


def arm_net(cfg, finetune: str, seed: int, num_classes=K):
    torch.manual_seed(0)                          # one base for every arm (LoRA's frozen part must agree)
    unet = ddpm.build_unet(cfg, num_classes)
    if finetune == "lora":
        torch.manual_seed(seed)
        ddm.add_lora(unet, 8, 32.0)
    return unet


def stacked_step(n_arms: int, cfg, finetune: str, z0, label, device):
    """One captured step of n_arms stacked arms -> a callable."""
    stack = Stacked([arm_net(cfg, finetune, a) for a in range(n_arms)]).to(device).train()
    scheduler = ddpm.build_scheduler(cfg, "ddpm")
    gens = [torch.Generator(device).manual_seed(a) for a in range(n_arms)]

    def draw(g):
        idx = torch.randint(len(z0), (cfg.batch_size,), generator=g, device=device)
        z_t, t, noise = ddpm.noisy_batch(scheduler, z0[idx], g)
        return z_t, t, ddpm.drop_labels(label[idx], K, cfg.p_uncond, g), noise

    def loss_fn(net, step, gens):
        z_t, t, c, noise = (torch.stack(x) for x in zip(*(draw(g) for g in gens)))        # [N, B, …]
        return (net(z_t, t, c).float() - noise).square().mean((1, 2, 3, 4))               # [N]
    params = list(stack.stacked)
    opt, sched = optimizer(params, cfg, cuda=True, graph=True)
    step = make_step(stack, loss_fn, gens, opt, sched, EMA(params, cfg.ema_decay), params,
                     gradient_clip(cfg, per_arm=True), cuda=True, graph=True)
    count = iter(range(10 ** 9))
    return lambda: step(next(count))


def one_arm_step(cfg, finetune: str, seed: int, z0, label, device):
    model = arm_net(cfg, finetune, seed).to(device)
    fn, _, _ = bench.make_train_step(model, cfg, z0, label, K, device, compile=False, graph=True)
    return fn


def resident_latents(device):
    gen = torch.Generator(device).manual_seed(0)
    return (torch.randn((bench.N_LATENTS, *LATENT), generator=gen, device=device),
            torch.randint(K, (bench.N_LATENTS,), generator=gen, device=device))


def train_flops_per_image(cfg, device) -> float:
    model = ddpm.build_unet(cfg, K).to(device)
    scheduler = ddpm.build_scheduler(cfg, "ddpm")
    z, c = torch.randn(bench.FLOP_BATCH, *LATENT, device=device), torch.zeros(bench.FLOP_BATCH, dtype=torch.long, device=device)

    def fwd_bwd():
        with torch.autocast("cuda", torch.bfloat16):
            ddpm.diffusion_loss(model, scheduler, z, c, torch.Generator(device).manual_seed(0)).backward()
    return bench.count_flops(fwd_bwd) / bench.FLOP_BATCH


def side_by_side(n_arms: int, args) -> float:
    """Images per second of n_arms worker processes started together (each waits for a go file)."""
    folder = Path(f"/tmp/bench-sweep-{n_arms}")
    folder.mkdir(parents=True, exist_ok=True)
    for f in folder.glob("*"):
        f.unlink()
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(a), "--folder", str(folder),
                               "--batch-size", str(args.batch_size), "--finetune", args.finetune,
                               "--steps", str(args.steps)]) for a in range(n_arms)]
    while len(list(folder.glob("ready-*"))) < n_arms:
        if any(p.poll() not in (None, 0) for p in procs):
            raise RuntimeError("a worker process failed")
        time.sleep(0.5)
    go = time.time()
    (folder / "go").write_text(str(go))
    for p in procs:
        p.wait()
    ends = [float(f.read_text()) for f in folder.glob("done-*")]
    return n_arms * args.steps * args.batch_size / (max(ends) - go)


def worker(args):
    cfg, device = setting(args.batch_size), "cuda"
    z0, label = resident_latents(device)
    step = one_arm_step(cfg, args.finetune, args.worker, z0, label, device)
    for _ in range(10):                         # warm-up and capture
        step()
    torch.cuda.synchronize()
    (args.folder / f"ready-{args.worker}").write_text("")
    while not (args.folder / "go").exists():
        time.sleep(0.01)
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    (args.folder / f"done-{args.worker}").write_text(str(time.time()))


def sampling_arm(cfg, seed: int, num_classes: int):
    """A LoRA arm whose zero-initialised tensors (each residual branch's last conv, the attention
    outputs, the norms' biases, the output conv, LoRA's B) are drawn at random, so that it predicts
    something: the frozen ones alike in every arm, the trained ones per seed."""
    net = arm_net(cfg, "lora", seed, num_classes)
    frozen, trained = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1 + seed)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(0.02 * torch.randn(p.shape, generator=trained if p.requires_grad else frozen))
    return net


def sampling_rates(dataset: str, n_arms: int, steps: int, scale: float, device, preset="small",
                   latents_per_arm=None) -> dict:
    """Stacked LoRA arms sampled in float32, captured (CUDA only) and in a bfloat16 copy (the docstring's
    --sampling)."""
    num_classes, latent = bench.DATASETS[dataset]["num_classes"], bench.DATASETS[dataset]["latent"]
    cfg = ddpm.base_config(data.DataConfig(dataset=dataset), preset)
    stack = Stacked([sampling_arm(cfg, a, num_classes) for a in range(n_arms)]).to(device).eval()
    scheduler = ddpm.build_scheduler(cfg, "ddim")
    scheduler.set_timesteps(steps)
    n = latents_per_arm or arm_batch(n_arms, 2 if scale != 1 else 1)              # one pass per step
    cond = torch.randint(num_classes, (n_arms, n), generator=torch.Generator().manual_seed(0)).to(device)
    entry, final = {"arms": n_arms, "latents_per_arm": n, "steps": steps, "guidance_scale": scale}, {}
    variants = [("float32", stack), ("bfloat16", copy.deepcopy(stack).to(torch.bfloat16))]
    if str(device).startswith("cuda"):                  # the float32 stack's forward captured once, replayed
        variants.insert(1, ("float32_graph", GraphDenoiser(stack)))
    for name, model in variants:
        def generate():
            gens = [torch.Generator(device).manual_seed(a) for a in range(n_arms)]
            final[name] = ddpm.sample_latents(model, scheduler, n, latent, cond=cond, guidance_scale=scale,
                                              generator=gens, device=device, batch_size=n, null_class=num_classes,
                                              autocast=False)                      # [N, n, c, h, w]
        seconds = bench.median_seconds(generate, device, warmup=1, windows=2, iters=1)
        entry[name] = {"seconds": seconds, "latents_per_s": n_arms * n / seconds}
        print(f"{dataset}, {n_arms} arms × {n} latents, DDIM-{steps}, CFG {scale:g}, {name}: "
              f"{entry[name]['latents_per_s']:,.0f} latents/s")
    fp32 = final["float32"].float()
    for name in [k for k in final if k != "float32"]:
        entry[f"{name}_over_float32"] = entry[name]["latents_per_s"] / entry["float32"]["latents_per_s"]
        entry[f"{name}_deviation"] = ((final[name].float() - fp32).square().mean().sqrt() / fp32.std()).item()
    return entry


def main(argv=None):
    p = argparse.ArgumentParser(description="N-arm sweep: stacked vs sequential vs side-by-side processes")
    p.add_argument("--arms", default="6,12,30")
    p.add_argument("--batch-size", type=int, default=256, help="images per arm and step")
    p.add_argument("--finetune", default="full", choices=["full", "lora"])
    p.add_argument("--steps", type=int, default=50, help="timed steps per process (side by side)")
    p.add_argument("--compare", choices=["diffusers"], default=None)
    p.add_argument("--diffusers-batch", type=int, default=1024)
    p.add_argument("--no-processes", dest="processes", action="store_false")
    p.add_argument("--sampling", action="store_true", help="time stacked sampling: float32, captured, bfloat16")
    p.add_argument("--sample-datasets", default="cmnist,celeba")
    p.add_argument("--sample-arms", type=int, default=23, help="default: one seed's FD arms of the prior protocol")
    p.add_argument("--sample-steps", type=int, default=10)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--out", default=None)
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--folder", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise ConfigError("bench_sweep.py times CUDA graphs: it needs a GPU")
    if args.worker is not None:
        return worker(args)
    torch.backends.cuda.matmul.allow_tf32 = True       # as ddm.py: the stacked arms run in float32 (stack.py)
    arms = [int(a) for a in args.arms.split(",")]
    info, device = bench.device_info("cuda"), "cuda"
    if args.sampling:
        report = {**info, "torch": torch.__version__, "sampling": {}}
        out = Path(args.out or f"bench/{info['device_slug']}-stacked-sampling.json")
        for dataset in args.sample_datasets.split(","):
            report["sampling"][dataset] = sampling_rates(dataset, args.sample_arms, args.sample_steps,
                                                         args.guidance_scale, device)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"-> {out}")
        return report
    cfg = setting(args.batch_size)
    flops = train_flops_per_image(cfg, device)
    z0, label = resident_latents(device)
    plan = dict(warmup=10, windows=5, iters=20)
    report = {**info, "torch": torch.__version__, "setting": {"latent": list(LATENT), "channels": cfg.channels,
              "batch_per_arm": args.batch_size, "finetune": args.finetune, "cuda_graph": True,
              "train_gflop_per_img": flops / 1e9}, "sweeps": {}}
    out = Path(args.out or f"bench/{info['device_slug']}-sweep-{args.finetune}.json")

    def record(name, img_per_s, **extra):
        entry = {"img_per_s": img_per_s, "mfu": bench.mfu(img_per_s * flops, info["peak_bf16_dense_flops"]), **extra}
        print(f"{name}: {img_per_s:,.0f} img/s" + (f", MFU {entry['mfu']:.1%}" if entry["mfu"] else ""))
        return entry
    if args.compare:
        import diffusers  # noqa: F401  (benchmark-only dependency)
        dcfg = setting(args.diffusers_batch)
        torch.manual_seed(0)
        model = bench.diffusers_unet(dcfg, K, LATENT).to(device).train()
        fn, _, _ = bench.make_train_step(model, dcfg, z0, label, K, device, compile=False, graph=True)
        s = bench.median_seconds(fn, device, plan["warmup"], plan["windows"], plan["iters"])
        report["diffusers_best"] = record(f"diffusers UNet2DModel, batch {args.diffusers_batch}, CUDA graph",
                                          args.diffusers_batch / s, batch=args.diffusers_batch)
        del model, fn
    for n in arms:
        entry = {}
        fn = stacked_step(n, cfg, args.finetune, z0, label, device)
        s = bench.median_seconds(fn, device, plan["warmup"], plan["windows"], plan["iters"])
        entry["stacked"] = record(f"{n} arms stacked", n * args.batch_size / s, ms_per_step=1e3 * s)
        del fn
        torch.cuda.empty_cache()
        steps = [one_arm_step(cfg, args.finetune, a, z0, label, device) for a in range(n)]
        s = bench.median_seconds(lambda: [f() for f in steps], device, 2, plan["windows"], 5)
        entry["sequential"] = record(f"{n} arms one after another", n * args.batch_size / s)
        del steps
        torch.cuda.empty_cache()
        if args.processes:
            entry["processes"] = record(f"{n} processes side by side", side_by_side(n, args))
        st = entry["stacked"]["img_per_s"]
        entry["ratios"] = {"stacked_over_sequential": st / entry["sequential"]["img_per_s"],
                           **({"stacked_over_processes": st / entry["processes"]["img_per_s"]} if args.processes else {}),
                           **({"stacked_over_diffusers_best": st / report["diffusers_best"]["img_per_s"]}
                              if args.compare else {})}
        report["sweeps"][str(n)] = entry
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"  ratios at N = {n}: " + ", ".join(f"{k} {v:.2f}" for k, v in entry["ratios"].items()))
    print(f"-> {out}")
    return report


if __name__ == "__main__":
    main_guard(main)
