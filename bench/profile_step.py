"""Where one training step's time goes: GPU kernel time against wall time, eager and compiled.

Run on a GPU from the repo root: `PYTHONPATH=. python3 bench/profile_step.py [--compile]`. Profiles
bench.py's own step (the cmnist config, batch 256) for a few steps after warm-up and prints

    wall ms/step | GPU busy ms/step (sum of kernel times) | kernels/step | top ops by self CPU time

If GPU busy time is far below wall time the step is bound by the host (Python, dispatch, launches),
not by the GPU. The committed output is bench/profile_step_h100.txt (eager; the compiled run did
not finish inside the 50 s it was given).
"""
import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import bench
import data
import ddpm

p = argparse.ArgumentParser()
p.add_argument("--compile", action="store_true")
p.add_argument("--batch-size", type=int, default=256)
a = p.parse_args()

cfg = ddpm.base_config(data.DataConfig(dataset="cmnist"), "small", batch_size=a.batch_size)
num_classes, latent = bench.DATASETS["cmnist"]["num_classes"], bench.DATASETS["cmnist"]["latent"]
model = ddpm.build_unet(cfg, num_classes, latent[0]).cuda().train()
z0 = torch.randn(bench.N_LATENTS, *latent, device="cuda")
label = torch.randint(num_classes, (bench.N_LATENTS,), device="cuda")
step, _, _ = bench.make_train_step(model, cfg, z0, label, num_classes, "cuda", a.compile)
for _ in range(15):
    step()
torch.cuda.synchronize()

N = 10
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    t0 = time.perf_counter()
    for _ in range(N):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / N
kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
busy = sum(e.device_time for e in kernels) / 1e3 / N                       # µs -> ms per step
print(f"compile {a.compile} batch {a.batch_size}: wall {wall * 1e3:.1f} ms/step, GPU busy {busy:.1f} ms/step, "
      f"{len(kernels) / N:.0f} kernels/step (profiler overhead included in wall)")
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
