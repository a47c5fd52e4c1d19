"""Stacked arms (stack.py): A arms trained as one model end exactly where A lone runs end."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import train as train_lib  # noqa: E402
from ddpm import DDPMScheduler, drop_labels, noisy_batch  # noqa: E402
from stack import Stacked, clip_per_arm  # noqa: E402
from config import TrainConfig  # noqa: E402
from unet import UNet  # noqa: E402

SCHED = DDPMScheduler(num_train_timesteps=100)
Z0, LABEL = torch.randn(32, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(32) % 2


def tiny_unet(seed, dtype=torch.float32):
    torch.manual_seed(seed)
    return UNet(4, (8, 16), num_res_blocks=1, num_classes=2, groups=4).to(dtype)


def draw(g, dtype=torch.float32):
    """One arm's batch, drawn exactly as a lone run draws it: (z_t, t, cond, ε) for 8 latents."""
    idx = torch.randint(32, (8,), generator=g)
    cond = drop_labels(LABEL[idx], 2, 0.5, g)
    z_t, t, noise = noisy_batch(SCHED, Z0[idx].to(dtype), g)
    return z_t, t, cond, noise.to(dtype)


def lone_loss(net, step, g, dtype=torch.float32):
    z_t, t, cond, noise = draw(g, dtype)
    return (net(z_t, t, cond) - noise).square().mean()


def stacked_loss(weights, dtype=torch.float32):
    def loss_fn(net, step, gens):
        z_t, t, cond, noise = (torch.stack(x) for x in zip(*(draw(g, dtype) for g in gens)))   # [A, 8, …]
        return weights.to(dtype) * (net(z_t, t, cond) - noise).square().mean((1, 2, 3, 4))      # [A]
    return loss_fn


@pytest.mark.parametrize("mode", ["norm", "value"])
def test_three_stacked_arms_train_like_three_lone_runs(tmp_path, mode):
    """Arms of other initial weights, seeds and loss weights; grad_clip small enough that clipping acts
    on every step, so a clip shared across arms (or a wrong one) would show. Weights, EMA and the
    logged per-arm losses agree with three lone runs.

    Both sides run in float64. The stacked and the lone kernels sum in different orders, and AdamW's
    step lr·m̂/(√v̂ + 1e-8) turns a gradient's rounding error Δg into an update error of up to lr·Δg/1e-8
    where a gradient is near zero: in float32 (Δg ~ 1e-9) that reaches the learning rate itself, so a
    float32 comparison holds or fails with the CPU's kernels. In float64, Δg ~ 1e-16 bounds each step's
    error by 3e-3·1e-16/1e-8 = 3e-11, 2e-10 over the 6 steps, well inside 1e-9 (observed: ~5e-15),
    while another arm's seed, batch or clipping moves a weight by 1e-5 or more."""
    seeds, weights, f64 = [3, 5, 7], torch.tensor([1.0, 0.5, 2.0]), torch.float64
    cfg = dict(steps=6, batch_size=8, lr=3e-3, warmup=2, ema_decay=0.9, ckpt_every=6, log_every=3,
               grad_clip=0.05 if mode == "norm" else 1e-3, grad_clip_mode=mode)
    lone = []
    for a, seed in enumerate(seeds):
        model = tiny_unet(a, f64)
        weighted = (lambda w: lambda net, step, g: w * lone_loss(net, step, g, f64))(float(weights[a]))
        lone.append(train_lib.train(model, weighted, TrainConfig(**cfg, seed=seed), tmp_path / f"lone{a}"))
        lone[-1]["model"] = model
    stack = Stacked([tiny_unet(a, f64) for a in range(3)])
    stats = train_lib.train(stack, stacked_loss(weights, f64), TrainConfig(**cfg), tmp_path / "stacked",
                            arm_seeds=seeds)
    for a in range(3):
        mine, theirs = stack.arm(a).state_dict(), lone[a]["model"].state_dict()   # both hold EMA weights
        for k in theirs:
            assert mine[k].dtype == theirs[k].dtype == f64, k
            assert torch.allclose(mine[k], theirs[k], rtol=1e-9, atol=1e-9), k
        # The log adds each step's float64 loss to a float32 sum (train.LossLog) and divides by the row's 3
        # steps, in float32 for the per-arm losses and in float64 for a lone run's: ε32/2 for the division,
        # and an ε32 per addition should losses ~1e-15 apart round to float32 on either side of a boundary
        # (observed: 2e-8; another arm's loss is 1e-2 or more away).
        assert stats["arm_loss"][a] == pytest.approx(lone[a]["loss"], rel=4 * torch.finfo(torch.float32).eps)
    moved = [(stack.arm(a).conv_in.weight - tiny_unet(a, f64).conv_in.weight).abs().max() for a in range(3)]
    assert min(moved) > 1e-3                                       # it trained: the comparison is not vacuous


def test_a_stacked_run_resumes_to_the_uninterrupted_weights(tmp_path):
    """Killed after the checkpoint of step 3 of 6 and resumed (its generators restored from the checkpoint)."""
    seeds, weights = [1, 2], torch.ones(2)
    cfg = dict(steps=6, batch_size=8, lr=3e-3, warmup=2, ema_decay=0.9, log_every=3)
    straight = Stacked([tiny_unet(0), tiny_unet(1)])
    train_lib.train(straight, stacked_loss(weights), TrainConfig(**cfg, ckpt_every=6), tmp_path / "a", arm_seeds=seeds)

    def killed(net, step, gens):
        if step == 3:                                              # after the step-3 checkpoint
            raise KeyboardInterrupt
        return stacked_loss(weights)(net, step, gens)
    with pytest.raises(KeyboardInterrupt):
        train_lib.train(Stacked([tiny_unet(0), tiny_unet(1)]), killed, TrainConfig(**cfg, ckpt_every=3),
                        tmp_path / "b", arm_seeds=seeds)
    resumed = Stacked([tiny_unet(4), tiny_unet(5)])
    train_lib.train(resumed, stacked_loss(weights), TrainConfig(**cfg, ckpt_every=3), tmp_path / "b", arm_seeds=seeds)
    for p, q in zip(straight.stacked, resumed.stacked):
        assert torch.equal(p, q)


def test_clip_per_arm_clips_each_arm_to_its_own_norm():
    """Arm 0's gradient (norm 5) is scaled to norm 1; arm 1's (norm 0.5) is left alone."""
    p = torch.zeros(2, 3, 4, requires_grad=True)
    q = torch.zeros(2, 5, requires_grad=True)
    p.grad = torch.zeros(2, 3, 4)
    q.grad = torch.zeros(2, 5)
    p.grad[0, 0, 0], q.grad[0, 0] = 3.0, 4.0                       # arm 0: ‖g‖ = 5
    p.grad[1, 1, 1] = 0.5                                          # arm 1: ‖g‖ = 0.5
    clip_per_arm([p, q], 1.0)
    arm0 = torch.cat([p.grad[0].flatten(), q.grad[0]]).norm()
    arm1 = torch.cat([p.grad[1].flatten(), q.grad[1]]).norm()
    assert arm0 == pytest.approx(1.0, rel=1e-5) and arm1 == pytest.approx(0.5)
    assert p.grad[0, 0, 0] / q.grad[0, 0] == pytest.approx(0.75)   # direction kept


def test_frozen_tensors_are_shared_and_must_agree():
    """Only trained tensors get an arm axis; a frozen tensor that differs between arms is refused."""
    arms = [tiny_unet(0), tiny_unet(1)]
    for m in arms:
        m.conv_in.requires_grad_(False)
    with pytest.raises(ValueError, match="conv_in.weight differs"):
        Stacked(arms)
    arms[1].conv_in.load_state_dict(arms[0].conv_in.state_dict())
    stack = Stacked(arms)
    assert "conv_in.weight" not in stack.names and stack.stacked[0].shape[0] == 2


def sampling_arms():
    """Two UNets on 1×4×4 latents whose output conv is not zero, so that they predict something.
    Not smaller: with 1×2×2 latents (a 1×1 map at the lowest level) GroupNorm under vmap raises
    "NYI: querying is_contiguous inside of vmap" on torch 2.11's CPU kernels."""
    arms = []
    for a in range(2):
        torch.manual_seed(a)
        arms.append(UNet(1, (8, 16), num_res_blocks=1, num_classes=2, groups=4))
        torch.nn.init.normal_(arms[-1].out[-1].weight, std=0.1)
    return arms


def test_stacked_sampling_with_cfg_is_each_arms_lone_sampling_at_any_batch_size():
    """Arm a of a stacked DDIM run with CFG draws what the lone arm draws from the same seed, and
    neither depends on the batch size the samples are drawn in. Latents of 1×4×4, 16 elements: a CPU
    generator gives the same numbers in chunks as at once only for chunks of a multiple of 16 elements."""
    from ddpm import DDIMScheduler, sample_latents
    arms = sampling_arms()
    stack = Stacked(arms).eval()
    ddim = DDIMScheduler(num_train_timesteps=100)
    ddim.set_timesteps(4)
    cond = torch.tensor([[0, 1, 0, 1, 1], [1, 1, 0, 0, 1]])
    gens = lambda: [torch.Generator().manual_seed(s) for s in (11, 12)]
    stacked = {b: sample_latents(stack, ddim, 5, (1, 4, 4), cond=cond, guidance_scale=3.0, generator=gens(),
                                 batch_size=b, null_class=2) for b in (2, 5)}
    assert torch.allclose(stacked[2], stacked[5], atol=1e-5)
    for a, seed in enumerate((11, 12)):
        lone = sample_latents(arms[a].eval(), ddim, 5, (1, 4, 4), cond=cond[a], guidance_scale=3.0,
                              generator=torch.Generator().manual_seed(seed), batch_size=3, null_class=2)
        # float32, as sampling runs: no optimiser amplifies rounding here, the 4 DDIM steps are a smooth
        # map of the kernels' few-ulp differences (observed: ~4e-7); another seed or arm moves a latent by O(1)
        assert torch.allclose(stacked[5][a], lone, atol=1e-4)


def test_the_graph_sampler_copies_every_steps_inputs_into_its_static_tensors():
    """GraphDenoiser(capture=False), as off CUDA, runs its copies around a plain call: sample_latents
    with it equals the plain loop, for a full and a last, smaller chunk (two static shapes), under CFG.
    A stale static input (a copy skipped) would replay step 1's latents or conditions at every step."""
    from cuda_graph import GraphDenoiser
    from ddpm import DDIMScheduler, sample_latents
    stack, ddim = Stacked(sampling_arms()).eval(), DDIMScheduler(num_train_timesteps=100)
    ddim.set_timesteps(4)
    cond = torch.tensor([[0, 1, 0, 1, 1], [1, 1, 0, 0, 1]])
    run = lambda model: sample_latents(model, ddim, 5, (1, 4, 4), cond=cond, guidance_scale=3.0,
                                       generator=[torch.Generator().manual_seed(s) for s in (11, 12)],
                                       batch_size=3, null_class=2)
    denoiser = GraphDenoiser(stack, capture=False)
    assert torch.equal(run(denoiser), run(stack))
    assert len(denoiser.graphs) == 2                        # chunks of 3 and 2 latents, each kept


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_captured_sampling_equals_eager_sampling_on_a_gpu():
    """On CUDA the stack's forward is captured once per shape and replayed at every DDIM step; the
    samples match the eager loop's (the same kernels; float32) and a second run reuses the graphs."""
    from cuda_graph import GraphDenoiser
    from ddpm import DDIMScheduler, sample_latents
    stack, ddim = Stacked(sampling_arms()).eval().cuda(), DDIMScheduler(num_train_timesteps=100)
    ddim.set_timesteps(10)
    cond = torch.tensor([[0, 1, 0, 1, 1], [1, 1, 0, 0, 1]], device="cuda")
    run = lambda model: sample_latents(model, ddim, 5, (1, 4, 4), cond=cond, guidance_scale=3.0, device="cuda",
                                       generator=[torch.Generator("cuda").manual_seed(s) for s in (11, 12)],
                                       batch_size=5, null_class=2, autocast=False)
    denoiser = GraphDenoiser(stack)
    eager, captured, again = run(stack), run(denoiser), run(denoiser)
    assert len(denoiser.graphs) == 1 and next(iter(denoiser.graphs.values()))[0] is not None
    assert torch.allclose(captured, eager, atol=1e-4) and torch.equal(captured, again)


def test_a_non_finite_loss_before_a_snapshot_writes_nothing(tmp_path):
    """A snapshot step saves like a checkpoint step, so it checks the loss first: a NaN at step 1 with
    a snapshot at step 2 stops the run and leaves no checkpoint or snapshot behind."""
    def loss_fn(net, step, gens):
        loss = stacked_loss(torch.ones(2))(net, step, gens)
        return loss * float("nan") if step == 1 else loss
    cfg = TrainConfig(steps=4, batch_size=8, lr=1e-3, warmup=1, ckpt_every=4, log_every=50, snapshots="2")
    with pytest.raises(FloatingPointError):
        train_lib.train(Stacked([tiny_unet(0), tiny_unet(1)]), loss_fn, cfg, tmp_path / "run", arm_seeds=[0, 1])
    assert not (tmp_path / "run" / "ckpt.pt").exists() and not (tmp_path / "run" / "ema_step2.pt").exists()
