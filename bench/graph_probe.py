"""Probe: the whole training step captured in one CUDA graph, against the eager step.

bench/profile_step_h100.txt shows the eager cmnist step is bound by the host (11.7 ms of GPU work in
a 36.8 ms step, 1,734 kernels). Replaying a CUDA graph launches all of them with one call, so this
measures what capture would buy before train.py adopts it. Run on a GPU from the repo root:

    PYTHONPATH=. python3 bench/graph_probe.py

What capture needs, and how this probe provides it (the usual whole-network recipe):
* static tensors: the latents live on the GPU and the batch is drawn inside the graph with the
  default CUDA generator (graph-safe: each replay advances its Philox offset);
* fused AdamW with capturable=True and the learning rate as a GPU tensor, set before each replay;
* the EMA decay as a GPU tensor (ema = decay·ema + (1 − decay)·θ with _foreach ops);
* autocast without its weight cache; three warm-up steps on a side stream before capture.
Prints ms/step for both and the mean loss of the last steps of each (they should agree).
"""
import time

import torch

import ddpm
from unet import UNet

CASES = [(8, (128, 256), 10, 256), (8, (128, 256), 10, 1024), (16, (128, 256, 256), 2, 256)]
STEPS, WARMUP = 100, 20


def setup(hw, channels, num_classes, batch):
    torch.manual_seed(0)
    unet = UNet(4, channels, 2, num_classes, 32).cuda().train()
    params = list(unet.parameters())
    z0 = torch.randn(20_000, 4, hw, hw, device="cuda")
    label = torch.randint(num_classes, (20_000,), device="cuda")
    scheduler = ddpm.build_scheduler(ddpm.DiffusionConfig(), "ddpm")

    def loss():  # the base model's loss; the default generator is graph-safe
        idx = torch.randint(len(z0), (batch,), device="cuda")
        return ddpm.diffusion_loss(unet, scheduler, z0[idx], ddpm.drop_labels(label[idx], num_classes, 0.1, None), None)
    return unet, params, loss


def eager(hw, channels, num_classes, batch):
    unet, params, loss_fn = setup(hw, channels, num_classes, batch)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    shadow = [p.detach().clone() for p in params]
    losses = []

    def step(s):
        with torch.autocast("cuda", torch.bfloat16):
            loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        torch._foreach_lerp_(shadow, [p.detach() for p in params], 1 - min(0.999, (1 + s) / (10 + s)))
        losses.append(loss.detach())
    return step, losses


def graphed(hw, channels, num_classes, batch):
    unet, params, loss_fn = setup(hw, channels, num_classes, batch)
    lr = torch.tensor(1e-4, device="cuda")
    opt = torch.optim.AdamW(params, lr=lr, fused=True, capturable=True)
    shadow = [p.detach().clone() for p in params]
    targets = [p.detach() for p in params]
    decay = torch.zeros((), device="cuda")
    static_loss = torch.zeros((), device="cuda")

    def body():
        with torch.autocast("cuda", torch.bfloat16, cache_enabled=False):
            loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        torch._foreach_mul_(shadow, decay)
        torch._foreach_add_(shadow, torch._foreach_mul(targets, 1 - decay))
        static_loss.copy_(loss.detach())

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            body()
    torch.cuda.current_stream().wait_stream(side)
    opt.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    losses = []

    def step(s):
        decay.fill_(min(0.999, (1 + s) / (10 + s)))  # lr stays constant here; a schedule would fill_ lr too
        graph.replay()
        losses.append(static_loss.clone())
    return step, losses


def timed(make, case):
    step, losses = make(*case)
    for s in range(WARMUP):
        step(s)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for s in range(WARMUP, WARMUP + STEPS):
        step(s)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / STEPS, float(torch.stack(losses[-20:]).mean())


for case in CASES:
    hw, channels, _, batch = case
    (t_e, loss_e), (t_g, loss_g) = timed(eager, case), timed(graphed, case)
    print(f"latent {hw}x{hw} channels {channels} batch {batch}: eager {t_e * 1e3:.1f} ms/step, "
          f"CUDA graph {t_g * 1e3:.1f} ms/step ({t_e / t_g:.2f}x); mean loss of the last 20 steps "
          f"{loss_e:.4f} vs {loss_g:.4f}", flush=True)
