"""Probe behind bench/README.md's "launch-bound" claim: ms per training step vs batch size and torch.compile.

Run on a GPU from the repo root: `PYTHONPATH=. python3 bench/steptime_probe.py`. The committed output
(bench/steptime_probe_h100.txt, one H100) was measured with an earlier copy of this loop that inlined
the same step; the step is now train.train_step itself.
"""
import time

import torch

import ddpm
import train
from unet import UNet

DEVICE = "cuda"
CASES = [  # (latent size, UNet channels, compile, batch)
    (8, (128, 256), False, 256), (8, (128, 256), False, 1024),
    (16, (128, 256, 256), False, 256), (16, (128, 256, 256), False, 1024),
    (8, (128, 256), True, 256), (8, (128, 256), True, 1024),
]

for hw, channels, compile_, batch in CASES:
    torch.manual_seed(0)
    unet = UNet(4, channels, 2, 10, 32).to(DEVICE)
    net = torch.compile(unet) if compile_ else unet
    scheduler = ddpm.build_scheduler(ddpm.DiffusionConfig(), "ddpm")
    params = list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    ema = train.EMA(params, 0.999)
    z0 = torch.randn(20000, 4, hw, hw, device=DEVICE)                  # resident random latents
    label = torch.randint(0, 10, (20000,), device=DEVICE)
    gen = torch.Generator(DEVICE).manual_seed(0)

    def loss_fn(model, step, gen):
        idx = torch.randint(len(z0), (batch,), generator=gen, device=DEVICE)
        return ddpm.diffusion_loss(model, scheduler, z0[idx], ddpm.drop_labels(label[idx], 10, 0.1, gen), gen)

    def steps(n, start):
        for s in range(start, start + n):
            train.train_step(net, loss_fn, s, gen, opt, sched, ema, params, train.gradient_clip(train.TrainConfig()), True)
        torch.cuda.synchronize()

    t0 = time.perf_counter()
    steps(15, 0)                                                      # warm-up (and compilation)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    steps(50, 15)
    dt = (time.perf_counter() - t0) / 50
    print(f"hw {hw} compile {compile_} B {batch}: {dt * 1000:.1f} ms/step, {batch / dt:.0f} img/s "
          f"(warmup {warm:.1f}s)", flush=True)
