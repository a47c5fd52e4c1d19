"""DistributedDataParallel through torchrun (CPU, gloo): two processes at a global batch of 8 train
the same weights as one process at batch 8, and only rank 0 writes the log, the checkpoint and samples.

Why the comparison is exact up to rounding. Step s uses a fixed global batch of 8 noisy latents
(z_t, t, ε, c drawn once from a fixed seed); under torchrun rank r takes rows [4r, 4r + 4) of it
(`train.local_batch`). The UNet has no batch statistics (GroupNorm is per sample), so

    ∇ mean_8 ‖ε − ε_θ‖²  =  ½ (∇ mean_rows0 + ∇ mean_rows1)  =  DDP's all-reduced average gradient,

and gradient clipping, AdamW, the LR schedule and the EMA then see the same numbers in both runs, up
to the rounding of the two summation orders. Both runs train in float64: AdamW's step
lr·m̂/(√v̂ + 1e-8) turns a gradient's rounding error Δg into an update error of up to lr·Δg/1e-8 where
a gradient is near zero, which in float32 (Δg ~ 1e-9) can reach the learning rate itself, so a float32
comparison would hold or fail with the CPU's kernels; with float64's Δg ~ 1e-16 the weights stay within
6 steps · 1e-3 · 1e-16 / 1e-8 = 6e-11 of each other.
Each step also draws one number from the rank's own generator (not used by the loss), so the
per-rank generator states that `Checkpoint.save` gathers are observable. The DDP run is interrupted after its
step-4 checkpoint and resumed, which also exercises loading those states rank by rank.

This file is also the worker: `python tests/test_ddp.py OUT CRASH_AT` (under torchrun or alone)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the repo's flat modules without installing
STEPS, GLOBAL_BATCH, LOG_EVERY, CKPT_EVERY = 6, 8, 2, 2
TOLERANCE = 1e-9               # max |w_ddp − w_single| (float64 rounding through 6 AdamW steps, see above)
NO_CRASH = -1                  # crash_at for an uninterrupted run


# -------------------------------------------------------------------------------------- worker
def worker(out: Path, crash_at: int):
    import torch.nn.functional as F
    from config import TrainConfig
    from train import distributed, local_batch, train
    from unet import UNet

    rank, world = distributed()
    torch.manual_seed(0)                                   # identical initial weights on every rank
    model = UNet(4, (8, 16), num_res_blocks=1, num_classes=3, groups=4).double()
    fixed = torch.Generator().manual_seed(1)
    shape = (STEPS, GLOBAL_BATCH)
    z_t = torch.randn(*shape, 4, 8, 8, generator=fixed).double()           # [steps, 8, 4, 8, 8]
    eps = torch.randn(*shape, 4, 8, 8, generator=fixed).double()
    t = torch.randint(0, 1000, shape, generator=fixed)                     # [steps, 8]
    c = torch.randint(0, 4, shape, generator=fixed)                        # class or ∅ = 3
    cfg = TrainConfig(steps=STEPS, batch_size=GLOBAL_BATCH, lr=1e-3, warmup=2, ckpt_every=CKPT_EVERY,
                      log_every=LOG_EVERY, seed=0)

    def loss_fn(net, step, gen):
        if step == crash_at:
            raise RuntimeError(f"planned crash at step {step}")
        torch.rand((), generator=gen)                      # advance this rank's generator (unused)
        b = local_batch(cfg.batch_size)
        rows = slice(rank * b, (rank + 1) * b)
        return F.mse_loss(net(z_t[step, rows], t[step, rows], c[step, rows]), eps[step, rows])

    def sample_fn(m, run):                                 # must run on rank 0 only
        (run / f"sampled-by-rank{rank}").touch()

    stats = train(model, loss_fn, cfg, out, sample_fn=sample_fn)
    (out / f"stats-rank{rank}.json").write_text(json.dumps(stats))
    torch.save(model.state_dict(), out / f"returned-rank{rank}.pt")        # the EMA weights train() leaves


# --------------------------------------------------------------------------------------- tests
def launch(out: Path, crash_at: int, nproc: int):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, __file__, str(out), str(crash_at)]
    if nproc > 1:
        with socket.socket() as s:                         # a free port for the rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd[1:1] = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                    "--master_addr", "127.0.0.1", "--master_port", str(port)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_ddp_matches_one_process_and_only_rank0_writes(tmp_path):
    single = launch(tmp_path / "single", NO_CRASH, 1)
    assert single.returncode == 0, single.stderr[-3000:]
    crashed = launch(tmp_path / "ddp", 5, 2)               # after the step-4 checkpoint
    assert crashed.returncode != 0 and "planned crash at step 5" in crashed.stderr, crashed.stderr[-3000:]
    resumed = launch(tmp_path / "ddp", NO_CRASH, 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout + resumed.stderr

    a = torch.load(tmp_path / "single" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == STEPS
    torch.manual_seed(0)
    from unet import UNet
    init = UNet(4, (8, 16), num_res_blocks=1, num_classes=3, groups=4).state_dict()
    for key in ("model", "ema_model"):
        diff = max((a[key][k] - b[key][k]).abs().max().item() for k in a[key])
        moved = max((a[key][k] - init[k]).abs().max().item() for k in init)
        assert diff < TOLERANCE, f"{key}: DDP and one process differ by {diff:.2e}"
        assert moved > 100 * TOLERANCE                    # the comparison is not trivially satisfied
    # the loss is the global batch's mean (all-reduced), not rank 0's half. The log sums it in float32
    # (train.LossLog): a few roundings of ε32 ≈ 1.2e-7 apart (observed: 1.2e-7), which no optimiser
    # step amplifies, so 1e-5 leaves a wide margin
    assert abs(a["loss"] - b["loss"]) < 1e-5 * abs(a["loss"]), (a["loss"], b["loss"])

    # each rank's generator state, in rank order, advanced one draw a step across the resume
    assert len(a["gen"]) == 1 and len(b["gen"]) == 2
    for rank, state in enumerate(b["gen"]):
        expected = torch.Generator().manual_seed(rank)     # train seeds rank r with seed·1000 + r
        torch.rand(STEPS, generator=expected)
        assert torch.equal(state, expected.get_state()), f"rank {rank}'s generator state"

    # rank 0 alone logs, checkpoints and samples; every rank returns the same EMA weights
    ddp = tmp_path / "ddp"
    assert (ddp / "sampled-by-rank0").exists() and not (ddp / "sampled-by-rank1").exists()
    steps_logged = [json.loads(line)["step"] for line in (ddp / "log.jsonl").read_text().splitlines()]
    assert steps_logged == [2, 4, 6]                       # crash after step 4; resumed for 6
    r0 = torch.load(ddp / "returned-rank0.pt", weights_only=True)
    r1 = torch.load(ddp / "returned-rank1.pt", weights_only=True)
    assert all(torch.equal(r0[k], r1[k]) and torch.equal(r0[k], b["ema_model"][k]) for k in r0)
    s0, s1 = (json.loads((ddp / f"stats-rank{r}.json").read_text()) for r in (0, 1))
    assert s0["loss"] == s1["loss"] == b["loss"]


if __name__ == "__main__":
    worker(Path(sys.argv[1]), int(sys.argv[2]))
