"""DDM's stacked fine-tune and InvDiff's stacked guidance modules, killed at a (seeded) random step and rerun,
end with the weights of the run that was never interrupted (bit for bit, on the CPU)."""
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ddm  # noqa: E402
import ddpm  # noqa: E402
import invdiff  # noqa: E402
import vae as vae_lib  # noqa: E402
from data import DataConfig  # noqa: E402
from environments import project_rows  # noqa: E402
from unet import UNet  # noqa: E402

STEPS, CKPT_EVERY = 6, 2


def kill_step(name: str) -> int:
    """A step after the first checkpoint, drawn from a generator seeded by the test's name."""
    return random.Random(name).randint(CKPT_EVERY + 1, STEPS - 1)


def killing(fn, at: int):
    """fn, but the call that computes step `at` (counting from 0) raises KeyboardInterrupt."""
    calls = iter(range(10 ** 6))

    def wrapped(*args, **kwargs):
        if next(calls) == at:
            raise KeyboardInterrupt
        return fn(*args, **kwargs)
    return wrapped


def counting(fn, calls: list):
    def wrapped(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)
    return wrapped


def tiny_pipe(monkeypatch):
    """An untrained tiny pipeline whose every dataset is 64 random latents, group 0 for a quarter."""
    cfg = ddpm.base_config(DataConfig(), "tiny")
    torch.manual_seed(0)
    autoencoder = vae_lib.build(vae_lib.vae_config(DataConfig(), "tiny"))
    pipe = ddpm.Pipeline(cfg, autoencoder, ddpm.build_unet(cfg, 10), "tiny", "cpu")
    pipe.run_dir, pipe.cfg.vae = Path("unused/base"), "vae"
    group = (torch.arange(64) % 4 == 0).long()
    latents = {"z0": torch.randn(64, 4, 8, 8, generator=torch.Generator().manual_seed(1)), "group": group,
               "label": group, "num_classes": 2}
    monkeypatch.setattr(vae_lib, "encode_dataset", lambda *args, **kwargs: latents)
    return pipe


def test_ddm_stacked_finetune_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    pipe = tiny_pipe(monkeypatch)
    cfg = ddm.DDMConfig(**{**ddm.PRESETS["prior"]["tiny"], "train_ratios": "1:4", "steps": STEPS,
                           "ckpt_every": CKPT_EVERY, "ema_decay": 0.9, "snapshots": "3"})
    arms = ddm.sweep_arms(cfg, "fd")                              # α 0 and 0.5, rebalanced, adversarial, 2 seeds
    straight = ddm.finetune(pipe, cfg, "fd", arms, 2, tmp_path / "straight")
    at = kill_step("ddm")
    with monkeypatch.context() as m:
        m.setattr(ddm, "ddm_loss", killing(ddm.ddm_loss, at))
        with pytest.raises(KeyboardInterrupt):
            ddm.finetune(pipe, cfg, "fd", arms, 2, tmp_path / "resumed")
    saved = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)["step"]
    calls = []
    with monkeypatch.context() as m:
        m.setattr(ddm, "ddm_loss", counting(ddm.ddm_loss, calls))
        resumed = ddm.finetune(pipe, cfg, "fd", arms, 2, tmp_path / "resumed")
    assert 0 < saved <= at and len(calls) == STEPS - saved         # resumed from the checkpoint, not restarted
    for a, b in zip(straight.stacked, resumed.stacked):
        assert torch.equal(a, b)
    for name in ("ckpt.pt", "ema_step3.pt"):
        a, b = (torch.load(p / name, weights_only=True)["ema_model"] for p in (tmp_path / "straight", tmp_path / "resumed"))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_invdiff_arms_resume_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    """Two stacked guidance modules (inferred λ = 1 at seed 0, erm at seed 1), killed and resumed."""
    base_cfg = ddpm.base_config(DataConfig(), "tiny")
    torch.manual_seed(0)
    base = UNet(4, (16, 32), 1, 10, 8)
    torch.nn.init.normal_(base.out[-1].weight, std=0.1)
    pipe = SimpleNamespace(unet=base, cfg=base_cfg, device="cpu")
    g = torch.Generator().manual_seed(2)
    z0, label = torch.randn(64, 4, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g)
    W = project_rows(torch.rand(64, 2, generator=g))
    arms = [invdiff.Arm("inferred", 1.0, 0), invdiff.Arm("erm", 0.0, 1)]
    envs = [W, torch.nn.functional.pad(torch.ones(64, 1), (0, 1))]
    cfg = invdiff.InvDiffConfig(**{**invdiff.PRESETS["tiny"], "steps": STEPS, "ckpt_every": CKPT_EVERY})

    def run(out):
        return invdiff.train_arms(pipe, cfg, arms, envs, z0, label, out)
    straight = run(tmp_path / "straight")
    with monkeypatch.context() as m:
        m.setattr(invdiff, "invariance_loss", killing(invdiff.invariance_loss, kill_step("invdiff")))
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / "resumed")
    saved = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)["step"]
    calls = []
    with monkeypatch.context() as m:
        m.setattr(invdiff, "invariance_loss", counting(invdiff.invariance_loss, calls))
        resumed = run(tmp_path / "resumed")
    assert 0 < saved and len(calls) == STEPS - saved                # resumed from the checkpoint, not restarted
    assert not torch.equal(straight.stacked[-1][0], straight.stacked[-1][1])    # the two arms differ
    for a, b in zip(straight.stacked, resumed.stacked):
        assert torch.equal(a, b)


def test_a_checkpoint_left_half_written_by_a_killed_process_is_cleaned_up(tmp_path):
    """A `ckpt.pt.<pid>.tmp` whose writer no longer runs goes at the next checkpoint; a live one stays."""
    import os
    import subprocess
    from datafiles import save_cache
    ended = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                               capture_output=True, text=True).stdout)
    stale, live = tmp_path / f"ckpt.pt.{ended}.tmp", tmp_path / f"ckpt.pt.{os.getppid()}.tmp"
    stale.write_bytes(b"half"), live.write_bytes(b"busy")
    save_cache({"config": {}, "step": 1}, tmp_path / "ckpt.pt")
    assert not stale.exists() and live.exists()
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 1
