"""DDM's objective, indicator and sampling contract (the end-to-end tiny sweep runs in notebook 02)."""
import inspect
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ddm  # noqa: E402
import ddpm  # noqa: E402
from unet import UNet  # noqa: E402

torch.set_num_threads(1)


def test_loss_equals_formula_on_fixed_tensors():
    g = torch.Generator().manual_seed(0)
    output, target = torch.randn(6, 4, 2, 2, generator=g), torch.randn(6, 4, 2, 2, generator=g)
    logits, y = torch.randn(6, 3, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])
    mse = ((output - target) ** 2).mean()
    ce = -(logits.log_softmax(-1)[torch.arange(6), y]).mean()
    for alpha in (0.0, 0.1, 0.5, 1.0):
        assert torch.allclose(ddm.ddm_loss(output, target, logits, y, alpha), (1 - alpha) * mse + alpha * ce)
    mask = torch.tensor([True, False, True, False, False, False])
    ce_masked = -(logits.log_softmax(-1)[[0, 2], y[[0, 2]]]).mean()
    assert torch.allclose(ddm.ddm_loss(output, target, logits, y, 0.3, mask), 0.7 * mse + 0.3 * ce_masked)


def test_alpha_zero_gives_the_plain_diffusion_gradient():
    torch.manual_seed(0)
    unet = UNet(4, (8, 16), 1, 10, 4)
    torch.nn.init.normal_(unet.out[-1].weight, std=0.1)                 # a non-zero output
    scheduler = ddpm.build_scheduler(ddpm.DiffusionConfig(), "ddpm")
    model = ddm.DDMModel(unet, ddm.Indicator(4 * 8 * 8, 2), scheduler)
    z0, y = torch.randn(4, 4, 8, 8), torch.tensor([0, 1, 0, 1])

    def grads(loss_of):
        unet.zero_grad()
        loss_of(torch.Generator().manual_seed(1)).backward()
        return [p.grad.clone() for p in unet.parameters()]

    def ddm_at_zero(gen):
        z_t, t, noise = ddpm.noisy_batch(scheduler, z0, gen)
        output, logits = model(z_t, t, None)
        return ddm.ddm_loss(output, scheduler.target(z0, noise, t), logits, y, 0.0)

    plain = grads(lambda gen: ddpm.diffusion_loss(unet, scheduler, z0, None, gen))
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(grads(ddm_at_zero), plain))
    assert any(a.abs().sum() > 0 for a in plain)


def test_indicator_separates_two_groups_of_separable_noise():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (512,), generator=g)
    eps_hat = torch.randn(512, 4, 4, 4, generator=g) + 0.5 * (2 * y - 1).float()[:, None, None, None]
    torch.manual_seed(0)
    indicator = ddm.Indicator(64, 2)
    opt = torch.optim.Adam(indicator.parameters(), lr=1e-3)
    for _ in range(200):
        opt.zero_grad()
        F.cross_entropy(indicator(eps_hat), y).backward()
        opt.step()
    test_y = torch.randint(0, 2, (512,), generator=g)
    test = torch.randn(512, 4, 4, 4, generator=g) + 0.5 * (2 * test_y - 1).float()[:, None, None, None]
    assert (indicator(test).argmax(-1) == test_y).float().mean() >= 0.95


def test_fd_sampling_takes_no_group_argument_and_is_seeded():
    """The sampler's only inputs are (n, shape, cond, seed): no group y can reach it."""
    assert not {"group", "y"} & set(inspect.signature(ddpm.Pipeline.sample_latents).parameters)
    assert not {"group", "y"} & set(inspect.signature(ddpm.sample_latents).parameters)
    torch.manual_seed(0)
    unet = UNet(4, (8, 16), 1, 10, 4)
    torch.nn.init.normal_(unet.out[-1].weight, std=0.1)
    scheduler = ddpm.build_scheduler(ddpm.DiffusionConfig(), "ddim")
    scheduler.set_timesteps(5)
    draw = lambda seed: ddpm.sample_latents(unet, scheduler, 3, (4, 8, 8), generator=torch.Generator().manual_seed(seed))
    assert torch.equal(draw(2), draw(2)) and not torch.equal(draw(2), draw(3))


def test_runtime_flags_reach_the_base_model(monkeypatch):
    """--cuda-graph / --compile change how every stage runs: ddm.py passes them to the base model's
    config (and ensure_base to the autoencoder's; test_invdiff's end-to-end run checks both)."""
    class Reached(Exception):
        pass

    def ensure_base(cfg, *args, **kwargs):
        raise Reached(cfg)
    monkeypatch.setattr(ddpm, "ensure_base", ensure_base)
    with pytest.raises(Reached) as got:
        ddm.main(["--dataset", "cmnist", "--preset", "tiny", "--device", "cpu", "--cuda-graph", "true"])
    base_cfg = got.value.args[0]
    assert isinstance(base_cfg, ddpm.DiffusionConfig) and base_cfg.cuda_graph and not base_cfg.compile
