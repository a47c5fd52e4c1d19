"""DDM's objective, indicator and sampling contract (the end-to-end tiny sweep runs in notebook 02)."""
import inspect
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ddm  # noqa: E402
import ddm_report  # noqa: E402
import ddpm  # noqa: E402
import vae as vae_lib  # noqa: E402
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


def base_config_of(monkeypatch, *flags):
    """The config `python ddm.py --dataset cmnist --preset tiny --device cpu <flags>` gives its base
    model (ensure_base is stopped there, so nothing trains)."""
    class Reached(Exception):
        pass

    def ensure_base(cfg, *args, **kwargs):
        raise Reached(cfg)
    monkeypatch.setattr(ddpm, "ensure_base", ensure_base)
    with pytest.raises(Reached) as got:
        ddm.main(["--dataset", "cmnist", "--preset", "tiny", "--device", "cpu", *flags])
    return got.value.args[0]


def test_runtime_flags_reach_the_base_model(monkeypatch):
    """--cuda-graph / --compile change how every stage runs: ddm.py passes them to the base model's
    config (and ensure_base to the autoencoder's; test_invdiff's end-to-end run checks both)."""
    base_cfg = base_config_of(monkeypatch, "--cuda-graph", "true")
    assert isinstance(base_cfg, ddpm.DiffusionConfig) and base_cfg.cuda_graph == "true" and not base_cfg.compile


# ============================================================================ the authors' regime

def test_lora_update_is_w_plus_scale_times_ba():
    """LoRALinear(x) = x (W + (lora_alpha / r) · B A)ᵀ + b, with the authors' scale 32 / 8 = 4."""
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    lora = ddm.LoRALinear(base, r=2, lora_alpha=8.0)
    torch.nn.init.normal_(lora.B)                                       # B starts at 0: give it a value
    x = torch.randn(3, 6)
    merged = base.weight + (8.0 / 2) * lora.B @ lora.A
    assert torch.allclose(lora(x), x @ merged.T + base.bias, atol=1e-5)
    assert not base.weight.requires_grad and lora.A.requires_grad and lora.B.requires_grad


def test_prior_arms_get_prompt_rows_initialised_from_the_null_row():
    """Protocol prior: FD appends one prompt row, SPD one per group, each equal to ∅'s row; ∅ stays at
    index K_base and the base rows are unchanged; under LoRA the class table still trains."""
    cfg = ddm.DDMConfig(protocol="prior", finetune="lora")
    pipe = tiny_pipe()
    base_table = pipe.unet.class_emb.weight.detach()                      # [K_base + 1, E]
    for scenario, rows in (("fd", 1), ("spd", 2)):
        table = ddm.arm_model(pipe, cfg, scenario, 2, seed=0).unet.class_emb.weight
        assert table.shape[0] == base_table.shape[0] + rows
        assert torch.equal(table[:len(base_table)], base_table)
        assert torch.equal(table[len(base_table):], base_table[-1].expand(rows, -1))
        assert table.requires_grad
    fd_biased = ddm.arm_model(pipe, ddm.DDMConfig(protocol="biased-base", finetune="full"), "fd", 2, seed=0)
    assert fd_biased.unet.class_emb.weight.shape == base_table.shape          # fine-tunes ∅ itself


def test_adversarial_arm_reverses_only_the_gradient_into_the_denoiser():
    """grad_sign −1 flips the CE's gradient on the UNet and leaves the indicator's and the values alone."""
    model = ddm.arm_model(tiny_pipe(), ddm.DDMConfig(protocol="biased-base", finetune="full"), "fd", 2, seed=0)
    torch.nn.init.normal_(model.unet.out[-1].weight, std=0.1)
    z, t, y = torch.randn(4, 4, 8, 8), torch.tensor([10, 200, 500, 900]), torch.tensor([0, 1, 0, 1])
    grads = {}
    for sign in (1.0, -1.0):
        model.zero_grad()
        out, logits = model(z, t, None, grad_sign=sign)
        F.cross_entropy(logits, y).backward()
        grads[sign] = (logits.detach(), model.unet.out[-1].weight.grad.clone(), model.indicator.net[0].weight.grad.clone())
    assert torch.allclose(grads[1.0][0], grads[-1.0][0])
    assert torch.allclose(grads[1.0][1], -grads[-1.0][1]) and grads[1.0][1].abs().sum() > 0
    assert torch.allclose(grads[1.0][2], grads[-1.0][2])


def test_rebalanced_pool_draws_both_groups_equally(monkeypatch):
    """The same-label baseline resamples the minority to the majority's size (with replacement)."""
    pipe, group = tiny_pipe(), torch.tensor([0] * 16 + [1] * 4)
    pipe.run_dir, pipe.cfg.vae = Path("runs-unused/base"), "vae"
    latents = {"z0": torch.randn(20, 4, 8, 8), "group": group, "label": group, "num_classes": 2}
    monkeypatch.setattr(vae_lib, "encode_dataset", lambda *args, **kwargs: latents)
    arms = [ddm.Arm("fd", "4:1", "ddm", 0.0, 0), ddm.Arm("fd", "4:1", "rebalanced", 0.0, 0)]
    _, pools = ddm.training_pools(pipe, ddm.DDMConfig(protocol="prior", train_ratios="4:1"), arms)
    assert torch.bincount(group[pools[0]]).tolist() == [16, 4]
    assert torch.bincount(group[pools[1]]).tolist() == [16, 16]


def test_the_prior_is_trained_on_balanced_data_and_biased_base_on_the_biased_data(monkeypatch):
    """Protocol prior trains its base at 1:1 whatever --bias says; biased-base on the --bias data."""
    for protocol, bias in (("prior", 0.5), ("biased-base", 0.8)):
        assert base_config_of(monkeypatch, "--protocol", protocol, "--bias", "0.8").bias == bias


def tiny_pipe():
    """A Pipeline around an untrained tiny UNet and autoencoder (nothing is trained or read from disk)."""
    cfg = ddpm.base_config(ddpm.data.DataConfig(), "tiny")
    torch.manual_seed(0)
    autoencoder = vae_lib.build(vae_lib.vae_config(ddpm.data.DataConfig(), "tiny"))
    return ddpm.Pipeline(cfg, autoencoder, ddpm.build_unet(cfg, 10), "tiny", "cpu")


def test_plot_labels_group_only_points_within_the_distance_of_a_runs_first_point():
    """The trade-off plot names nearby α points with one label; a chain of near points does not merge
    into one run once it has drifted min_dist from the run's first point."""
    points = torch.tensor([[0.0, 0.0], [10.0, 0.0], [20.0, 0.0], [30.0, 0.0], [31.0, 0.0], [100.0, 0.0]])
    assert ddm_report.near_groups(points, 25.0) == [[0, 1, 2], [3, 4], [5]]
    assert ddm_report.near_groups(points, 1.0) == [[0], [1], [2], [3], [4], [5]]

