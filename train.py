"""The one training loop every stage uses (VAE, base diffusion model, DDM arms, InvDiff modules).

    for step in range(start, steps):
        loss = loss_fn(model, step, gen)   # the stage draws its batch with gen; [] or [A] for A stacked arms
        loss.sum().backward(); clip(params); AdamW.step(); lr_schedule.step()
        ema ← d·ema + (1 − d)·params,   d(step) = min(ema_decay, (1 + step) / (10 + step))
        every log_every steps the mean loss goes to log.jsonl; every ckpt_every steps a checkpoint

The learning rate warms up linearly, lr·(s + 1)/warmup for s < warmup, then stays at lr (constant) or
follows lr·½(1 + cos(π·(s − warmup)/(steps − warmup))) (cosine). The EMA warm-up matters: a plain
0.9999 EMA of a short run still sits near the initial weights and samples pure noise. On CUDA the
forward pass runs under bf16 autocast, and `--cuda-graph true` (the command-line default on one GPU)
replays the same step from one CUDA graph (cuda_graph.py). Under torchrun each rank draws
batch_size / world samples from its own generator and DistributedDataParallel averages the gradients.

Every `ckpt_every` steps and at the end the whole state (config, step, weights, EMA, optimiser,
schedule, RNG) is written to a temp file and moved into place with `os.replace` (datafiles.save_cache),
so a crash never leaves a half-written checkpoint; rerunning the same config resumes exactly.
A non-finite loss stops the run before the next checkpoint, so the last good one stays intact.
Ctrl-C or SIGTERM (a job scheduler's stop) finishes the current step, writes a checkpoint and stops,
so rerunning the same command resumes exactly there; a second signal stops at once. (One process
only: under torchrun a signal stops it the plain way and the run resumes from the last checkpoint.)
The configuration and its command line live in config.py.
"""
import json
import math
import os
import random
import signal
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from config import (ConfigError, Stopped, TrainConfig, check_train_config, check_writable, comparable,
                    snapshot_steps, use_cuda_graph, world_size)
from cuda_graph import GraphStep, match_optimizer
from datafiles import save_cache, write_atomic
from stack import clip_per_arm


# ------------------------------------------------------------------------------------- checkpoints
def load_checkpoint(path: Path, cfg=None, map_location="cpu") -> dict:
    """Load with weights_only=True; refuse one written by a different config."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # truncated, not a torch file, unpickling refused
        raise ConfigError(f"checkpoint {path} is unreadable ({type(e).__name__}); delete it or pass --fresh")
    if not isinstance(state, dict) or "config" not in state:
        raise ConfigError(f"checkpoint {path} has no config; it was not written by fairdiff")
    if cfg is not None and state["config"] != comparable(cfg):
        diff = [k for k in set(state["config"]) | set(comparable(cfg))
                if state["config"].get(k) != comparable(cfg).get(k)]
        raise ConfigError(f"checkpoint {path} was written by another config (differs in "
                          f"{', '.join(sorted(diff))}); use --fresh or another --runs folder")
    return state


def truncate_log(path: Path, step: int):
    """Drop the log rows written after the checkpoint's step (a run killed between a log line and the
    next checkpoint logged steps that the resumed run will log again)."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in rows if logged_step(line) <= step]
    if len(kept) < len(rows):
        write_atomic(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))


def logged_step(line: str) -> float:
    """The step of one log row; a row cut off by a kill counts as after every checkpoint."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


# --------------------------------------------------------------------------------------- processes
def local_batch(batch_size: int) -> int:
    """Each of the world's ranks draws batch_size / world samples (the global batch is fixed)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if batch_size % world:
        raise ConfigError(f"--batch-size {batch_size} is not divisible by {world} processes")
    return batch_size // world


def seed_everything(seed: int):
    random.seed(seed)
    torch.manual_seed(seed)


def distributed() -> tuple:
    """(rank, world_size): set up the process group once when launched by torchrun."""
    if world_size() == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return dist.get_rank(), dist.get_world_size()


# -------------------------------------------------------------------------------------------- step
def lr_lambda(cfg: TrainConfig):
    def factor(step):
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        if cfg.lr_schedule == "cosine":
            progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0
    return factor


def optimizer(params, cfg: TrainConfig, cuda: bool, graph=False):
    """AdamW (fused on CUDA) and its LR schedule. For a CUDA graph the learning rate is a tensor,
    which the schedule fills in place before each replay, and the optimiser (on CUDA) capturable."""
    lr = torch.tensor(cfg.lr, device=params[0].device) if graph else cfg.lr
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, fused=cuda, capturable=graph and cuda)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))


class EMA:
    """Exponential moving average of the trainable parameters, with warm-up:
    shadow ← d·shadow + (1 − d)·θ,  d = min(max_decay, (1 + step) / (10 + step)).
    d lives in a device tensor (set_decay, then apply), so a captured step can read it."""

    def __init__(self, params, max_decay: float):
        self.params = list(params)
        self.shadow = [p.detach().clone() for p in self.params]
        self.max_decay = max_decay
        self.decay = torch.zeros((), device=self.params[0].device)

    def set_decay(self, step: int):
        self.decay.fill_(min(self.max_decay, (1 + step) / (10 + step)))

    @torch.no_grad()
    def apply(self):
        torch._foreach_mul_(self.shadow, self.decay)
        torch._foreach_add_(self.shadow, torch._foreach_mul([p.detach() for p in self.params], 1 - self.decay))

    @torch.no_grad()
    def copy_to(self, params):
        for s, p in zip(self.shadow, params):
            p.copy_(s)


def gradient_clip(cfg: TrainConfig, per_arm=False):
    """params -> None, clipping their gradients in place: by norm (per arm for a stacked model,
    stack.clip_per_arm) or by value."""
    if cfg.grad_clip_mode == "value":
        return lambda params: torch.nn.utils.clip_grad_value_(params, cfg.grad_clip)
    if per_arm:
        return lambda params: clip_per_arm(params, cfg.grad_clip)
    return lambda params: torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)


def train_step(net, loss_fn, step, gen, opt, sched, ema, params, clip, cuda) -> torch.Tensor:
    """One optimiser step, the body of the loop (bench.py times exactly this); the detached loss."""
    opt.zero_grad(set_to_none=True)
    ema.set_decay(step)
    loss = optimise(net, loss_fn, step, gen, opt, ema, params, clip, cuda)
    sched.step()
    return loss


def optimise(net, loss_fn, step, gen, opt, ema, params, clip, cuda, autocast_cache=True) -> torch.Tensor:
    """Forward (bf16 autocast on CUDA), backward, grad clip, AdamW, EMA: the part of a step that a CUDA
    graph captures (cuda_graph.GraphStep); zeroing the gradients and the LR / EMA-decay schedules stay outside.
    The loss is a scalar, or one per arm [A] for a stacked model (their sum is minimised)."""
    with torch.autocast("cuda", torch.bfloat16, enabled=cuda, cache_enabled=autocast_cache):
        loss = loss_fn(net, step, gen)
    loss.sum().backward()
    clip(params)
    opt.step()
    ema.apply()
    return loss.detach()


def make_step(net, loss_fn, gen, opt, sched, ema, params, clip, cuda, graph=False):
    """The loop's step as a callable step -> detached loss: train_step, or with graph a
    cuda_graph.GraphStep that captures the same body (optimise) and replays it."""
    if graph:
        def body(step):
            return optimise(net, loss_fn, step, gen, opt, ema, params, clip, cuda,
                            autocast_cache=False)            # no cast cache across replays
        return GraphStep(body, opt, sched, ema, gen)
    return lambda step: train_step(net, loss_fn, step, gen, opt, sched, ema, params, clip, cuda)


# -------------------------------------------------------------------------------------------- loop
class StopRequest:
    """While active, SIGINT / SIGTERM only set `requested`; the loop checkpoints at the end of the
    step and raises Stopped. A second signal raises KeyboardInterrupt at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, enabled: bool):
        self.enabled, self.requested, self.previous = enabled, False, {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        if self.enabled:
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class Checkpoint:
    """out/ckpt.pt of one run: all that resumes it exactly, and its EMA weights (`ema_model`) for using
    the model. Under torchrun every rank takes part (all ranks' batch generators are saved); rank 0 writes."""

    def __init__(self, out: Path, cfg, model, params, opt, sched, ema, gens, rank, world, device, graph):
        self.out, self.path, self.cfg, self.device, self.graph = out, out / "ckpt.pt", cfg, device, graph
        self.model, self.params, self.opt, self.sched, self.ema, self.gens = model, params, opt, sched, ema, gens
        self.rank, self.world = rank, world

    def resume(self) -> int:
        """Load out/ckpt.pt when there is one (refused when another config wrote it): -> its step, else 0."""
        if not self.path.exists():
            return 0
        state = load_checkpoint(self.path, self.cfg, map_location=self.device)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        match_optimizer(self.opt, self.graph, str(self.device).startswith("cuda"))   # saved with(out) --cuda-graph
        self.sched.load_state_dict(state["sched"])
        for s, v in zip(self.ema.shadow, state["ema"]):
            s.copy_(v)
        per_rank = len(self.gens)                             # one generator per arm
        if len(state["gen"]) != self.world * per_rank:
            raise ConfigError(f"checkpoint {self.path} holds {len(state['gen'])} batch generators, not "
                              f"{self.world * per_rank} ({self.world} process(es) x {per_rank} arm(s)); "
                              f"resume with as many or pass --fresh")
        for g, saved in zip(self.gens, state["gen"][self.rank * per_rank:]):
            g.set_state(saved.cpu())
        step = state["step"]
        if self.rank == 0:
            truncate_log(self.out / "log.jsonl", step)
            if step < self.cfg.steps:
                print(f"resuming {self.out} from step {step}")
        return step

    def save(self, step: int, loss: float, snapshot: bool, sample_fn=None):
        """Write out/ckpt.pt (with snapshot also out/ema_step<step>.pt, the EMA weights alone), then
        call sample_fn(model, out) with the EMA weights in the model; the raw weights go back after."""
        states = [g.get_state() for g in self.gens]
        if self.world > 1:  # every rank's batch generator, so a resume is exact
            states = [torch.empty_like(states[0]) for _ in range(self.world)]
            dist.all_gather_object(states, self.gens[0].get_state())
        if self.rank != 0:
            return
        raw = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.ema.copy_to(self.params)
        ema_model = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        config = comparable(self.cfg)
        save_cache({"config": config, "step": step, "model": raw, "ema_model": ema_model, "ema": self.ema.shadow,
                    "opt": self.opt.state_dict(), "sched": self.sched.state_dict(), "gen": states, "loss": loss},
                   self.path)
        if snapshot:
            save_cache({"config": config, "step": step, "ema_model": ema_model}, self.out / f"ema_step{step}.pt")
        if sample_fn is not None:
            self.model.eval()
            sample_fn(self.model, self.out)
            self.model.train()
            if self.graph:  # the graph's private memory pool stays reserved: give sampling's back
                torch.cuda.empty_cache()
        self.model.load_state_dict(raw)

    def load_ema_weights(self, loss: float) -> float:
        """Leave the checkpoint's EMA weights in the model: -> the loss it recorded (loss if there is none)."""
        if not self.path.exists():
            return loss
        state = torch.load(self.path, map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["ema_model"])
        return state["loss"]


class LossLog:
    """The loss, summed on the device between rows (reading it is the loop's only host sync), written as
    a row of out/log.jsonl (rank 0) and on the progress bar. A non-finite loss raises at the next row,
    and a row comes before every checkpoint, so a checkpoint never holds a non-finite run."""

    def __init__(self, out: Path, cfg: TrainConfig, step: int, arms, rank, world, device, desc):
        self.file = open(out / "log.jsonl", "a") if rank == 0 and step < cfg.steps else None
        self.bar = tqdm(total=cfg.steps, initial=step, desc=desc, disable=rank != 0, dynamic_ncols=True)
        self.finite = torch.ones((), dtype=torch.bool, device=device)
        self.sum = torch.zeros(() if arms is None else arms, device=device)   # [] or [A]
        self.loss, self.arm_loss, self.logged, self.t0 = float("nan"), [], step, time.perf_counter()
        self.images, self.stacked, self.world = cfg.batch_size * (arms or 1), arms is not None, world

    def add(self, loss: torch.Tensor):
        self.finite &= torch.isfinite(loss).all()
        self.sum += loss.float()

    def write(self, step: int, lr, ckpt: Path):
        if self.world > 1:  # the global batch's loss (not rank 0's share); every rank stops together
            total = torch.stack([self.sum / self.world, (~self.finite).float()])
            dist.all_reduce(total)
            self.sum, self.finite = total[0], total[1] == 0
        if not self.finite:
            raise FloatingPointError(f"non-finite loss before step {step}; the last good "
                                     f"checkpoint {ckpt} is intact (lower --lr?)")
        n, self.logged = step - self.logged, step                    # steps summed since the last row
        self.arm_loss = (self.sum / n).tolist()
        self.loss = self.sum.mean().item() / n
        self.sum.zero_()
        dt, self.t0 = time.perf_counter() - self.t0, time.perf_counter()
        if self.file:
            row = {"step": step, "loss": self.loss, "lr": float(lr), "img_per_s": n * self.images / dt}
            self.file.write(json.dumps({**row, "arm_loss": self.arm_loss} if self.stacked else row) + "\n")
            self.file.flush()
        self.bar.set_postfix(loss=f"{self.loss:.4f}")

    def close(self):
        self.bar.close()
        if self.file:
            self.file.close()


def wrap(model, cfg: TrainConfig, world: int, cuda: bool):
    """What the step calls: the model, in DistributedDataParallel under torchrun, compiled with --compile."""
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[torch.cuda.current_device()] if cuda else None)
    if cfg.compile and cuda:
        net = torch.compile(net)
    return net


def train(model: torch.nn.Module, loss_fn, cfg: TrainConfig, out: Path, *, params=None, sample_fn=None,
          device="cpu", desc="train", arm_seeds=None) -> dict:
    """Train `params` (default: all of model's) by minimising loss_fn(model, step, generator).

    loss_fn draws its own batch with the given torch.Generator (seeded, saved in checkpoints, so a
    resumed run sees the same batches as an uninterrupted one). Resumes from out/ckpt.pt when its
    config matches cfg. Leaves the EMA weights in `model` and returns {"step", "loss", "seconds",
    "img_per_s"}. sample_fn(model, out) is called with EMA weights at every checkpoint (e.g. to
    write samples.png).
    A stacked model (stack.Stacked) passes arm_seeds, one per arm: loss_fn then gets a list of A
    generators (arm a's seeded as a lone run of seed arm_seeds[a] would be) and returns the A losses
    [A]; gradients are clipped per arm, and "arm_loss" is returned and logged beside their mean."""
    check_train_config(cfg)
    rank, world = distributed()
    out, cuda, stacked = Path(out), str(device).startswith("cuda"), arm_seeds is not None
    graph = use_cuda_graph(cfg, cuda, world)
    if stacked and world > 1:
        raise ConfigError("stacked arms train in one process (not under torchrun)")
    params = [p for p in (params or model.parameters()) if p.requires_grad]
    opt, sched = optimizer(params, cfg, cuda, graph)
    ema = EMA(params, cfg.ema_decay)
    gens = [torch.Generator(device).manual_seed(seed * 1000 + rank) for seed in (arm_seeds or [cfg.seed])]
    ckpt = Checkpoint(out, cfg, model, params, opt, sched, ema, gens, rank, world, device, graph)
    step = start = ckpt.resume()
    if step < cfg.steps:            # a finished run writes nothing, so it may sit in a read-only folder
        check_writable(out)
    take_step = make_step(wrap(model, cfg, world, cuda), loss_fn, gens if stacked else gens[0], opt, sched, ema,
                          params, gradient_clip(cfg, per_arm=stacked), cuda, graph)
    snapshots = snapshot_steps(cfg)
    log = LossLog(out, cfg, step, len(gens) if stacked else None, rank, world, device, desc)
    t_start = time.perf_counter()
    model.train()
    one_main_thread = world == 1 and threading.current_thread() is threading.main_thread()
    with StopRequest(one_main_thread) as stop:  # Ctrl-C / SIGTERM: finish the step, checkpoint, stop
        while step < cfg.steps:
            loss = take_step(step)              # forward, loss, backward, clip, AdamW, LR schedule, EMA
            log.add(loss)
            step += 1
            stopping = stop.requested  # read once: a signal between the checks below waits a step
            saving = step % cfg.ckpt_every == 0 or step == cfg.steps or stopping or step in snapshots
            if step % cfg.log_every == 0 or saving:     # the finite check comes before every save
                log.write(step, sched.get_last_lr()[0], ckpt.path)
            log.bar.update(1)
            if saving:
                ckpt.save(step, log.loss, step in snapshots, sample_fn)
            if stopping:
                log.close()
                raise Stopped(f"at step {step} of {cfg.steps}; checkpoint {ckpt.path} written, "
                              f"run the same command again to resume")
    log.close()
    if graph:
        take_step.close()
    seconds = time.perf_counter() - t_start
    if world > 1:  # wait for rank 0's last checkpoint, so every rank returns its EMA weights
        dist.barrier()
    trained = step - start
    stats = {"step": step, "loss": ckpt.load_ema_weights(log.loss), "seconds": seconds,
             "img_per_s": trained * cfg.batch_size * len(gens) / seconds if trained else float("nan")}
    return {**stats, "arm_loss": log.arm_loss} if stacked else stats
