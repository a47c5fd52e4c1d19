"""The one training loop every stage uses (VAE, base diffusion model, DDM arms, InvDiff modules).

    for step in range(start, steps):
        loss = loss_fn(model, step)                        # the stage decides what a batch is
        loss.sum().backward(); clip(params); AdamW.step(); lr_schedule.step()   # one loss, or one per arm
        ema ← decay·ema + (1 − decay)·params,   decay(s) = min(ema_decay, (1 + s) / (10 + s))

The EMA warm-up matters: a plain 0.9999 EMA of a short run still sits near the initial weights and
samples pure noise. On CUDA the forward pass runs under bf16 autocast, and `--cuda-graph true`
(the command-line default on one GPU) replays the whole step from one CUDA graph (GraphStep).
Every `ckpt_every` steps and at the end the whole state (config, step, weights, EMA, optimiser,
schedule, RNG) is written to a temp file and moved into place with `os.replace`, so a crash never
leaves a half-written checkpoint.
A non-finite loss stops the run before the next checkpoint, so the last good one stays intact.
Ctrl-C or SIGTERM (a job scheduler's stop) finishes the current step, writes a checkpoint and stops,
so rerunning the same command resumes exactly there; a second signal stops at once. (One process
only: under torchrun a signal stops it the plain way and the run resumes from the last checkpoint.)

Also here: the config → argparse helper (`parse_config`), presets, run directories named by a config
hash (`run_dir`) so later stages find earlier ones, and `checkpoint`/`load_checkpoint`.
"""
import argparse
import hashlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from datafiles import write_atomic
from stack import clip_per_arm

PRESETS = ("tiny", "small", "full")
FILLED_IN = ("preset", "vae")     # config fields the code fills in, never flags
NOT_HASHED = ("data_root", "ckpt_every", "log_every", "compile", "cuda_graph", "download", "min_cell", "snapshots")
RUNTIME = ("compile", "cuda_graph")   # how a stage runs, not what it learns: passed on to every stage


@dataclass
class TrainConfig:
    steps: int = 2000              # optimiser steps
    batch_size: int = 128          # global batch (split across ranks under torchrun)
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup: int = 100              # linear LR warm-up steps
    lr_schedule: str = "constant"  # constant | cosine (after warm-up)
    grad_clip: float = 1.0
    grad_clip_mode: str = "norm"   # norm: rescale to ‖g‖ ≤ grad_clip | value: clamp each entry to ±grad_clip
    ema_decay: float = 0.999       # the EMA's largest decay (reached after warm-up)
    ckpt_every: int = 1000         # also written at the end
    log_every: int = 50            # loss to log.jsonl / tqdm (the only host-device sync)
    seed: int = 0
    compile: bool = False          # torch.compile the model (CUDA only)
    cuda_graph: bool = False       # capture the whole step in one CUDA graph (GraphStep; CLI default on one GPU)
    snapshots: str = ""            # steps at which the EMA weights are also kept, as ema_step<N>.pt


# ------------------------------------------------------------------------------------------ config
class ConfigError(ValueError):
    """A bad flag, file or state; the CLI prints its one line and exits 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line through main_guard instead of usage + message
        raise ConfigError(f"{message} (see --help)")


def parse_config(cls, presets: dict, argv=None, description=""):
    """Build argparse from the dataclass fields, apply the preset, then the explicit flags.

    Flags are the field names with '-' for '_'; booleans take true/false; a preset is a dict of
    field values (`--preset tiny|small|full`, default small on a GPU and tiny otherwise).
    Returns (cfg, args) where args also holds --preset, --fresh, --runs and --device."""
    p = _Parser(description=description)
    p.add_argument("--preset", choices=PRESETS, default=None)
    p.add_argument("--fresh", action="store_true", help="retrain every stage instead of reusing")
    p.add_argument("--runs", default="runs", help="where run directories go")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    for f in fields(cls):
        if f.name in FILLED_IN:
            continue
        kind = {bool: _bool, int: int, float: float}.get(type(f.default), str)
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None, help=f"default {f.default!r}")
    args = p.parse_args(argv)
    os.environ["FAIRDIFF_RUNS"] = args.runs           # the run root, where data.py caches decoded images
    args.device = check_device(args.device)
    if args.preset is None:
        args.preset = "small" if args.device.startswith("cuda") else "tiny"
    values = dict(presets.get(args.preset, {}))
    values.update(explicit_flags(cls, args))
    if graph_by_default(cls, args.device, values):
        values["cuda_graph"] = True
    cfg = cls(**values)
    cuda = args.device.startswith("cuda")
    print(f"preset {args.preset} on {args.device}" + ("" if cuda else " (no GPU: use --preset small on a GPU)")
          + (" with CUDA graphs (--cuda-graph false: eager)" if cuda and getattr(cfg, "cuda_graph", False) else ""))
    return cfg, args


def graph_by_default(cls, device: str, values: dict) -> bool:
    """The command-line default of --cuda-graph: on for one CUDA process unless --cuda-graph or --compile
    was given. Every train() stage has trained as a graph on an H100 and an H200, and a captured step is
    1.5–4.3× faster than the eager one (bench/README.md). The dataclass default
    stays False, so code that builds configs itself (tests, notebooks) runs eagerly unless it asks."""
    one_process = int(os.environ.get("WORLD_SIZE", "1")) == 1     # torchrun sets WORLD_SIZE
    return (issubclass(cls, TrainConfig) and device.startswith("cuda") and one_process
            and "cuda_graph" not in values and not values.get("compile", False))


def check_device(device) -> str:
    """`--device` names cpu or a CUDA GPU this machine has; None: cuda when there is one, else cpu."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        where = torch.device(device)
    except RuntimeError:
        where = None
    if where is None or where.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device}: unknown device; choose cpu, cuda or cuda:N")
    if where.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available; use --device cpu")
    if where.type == "cuda" and (where.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s), "
                          f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def int_list(flag: str, text: str) -> list:
    """'16,32' -> [16, 32]; anything else (empty, not a number, below 1) is one line naming the flag."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ConfigError(f"--{flag} {text!r}: expected comma-separated positive integers, e.g. 16,32")
    return values


def check_train_config(cfg: TrainConfig):
    """Called before any stage trains, so a bad flag fails at once, not after the autoencoder."""
    if cfg.steps < 0 or cfg.batch_size <= 0 or cfg.lr <= 0:
        raise ConfigError(f"--steps {cfg.steps} must be >= 0, --batch-size {cfg.batch_size} and "
                          f"--lr {cfg.lr} > 0")
    if cfg.compile and cfg.cuda_graph:
        raise ConfigError("--compile true and --cuda-graph true: choose one (both remove launch overhead)")
    if cfg.grad_clip_mode not in ("norm", "value"):
        raise ConfigError(f"--grad-clip-mode {cfg.grad_clip_mode!r}: choose norm or value")
    try:
        snapshot_steps(cfg)
    except ValueError:
        raise ConfigError(f"--snapshots {cfg.snapshots!r}: expected comma-separated step numbers, e.g. 250,500")


def snapshot_steps(cfg: TrainConfig) -> set:
    return {int(s) for s in cfg.snapshots.split(",") if s.strip()}


def explicit_flags(cls, args) -> dict:
    """The config fields the user set on the command line (they beat any preset)."""
    return {f.name: getattr(args, f.name) for f in fields(cls)
            if f.name not in FILLED_IN and getattr(args, f.name) is not None}


def runtime_flags(cfg) -> dict:
    """The RUNTIME flags of cfg, for the stages it builds on (autoencoder, base model)."""
    return {k: getattr(cfg, k) for k in RUNTIME}


def _bool(s: str) -> bool:
    if s.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")
    return s.lower() in ("true", "1", "yes")


def config_hash(cfg) -> str:
    """8 hex digits of the config (fields that cannot change the result are skipped)."""
    return hashlib.sha1(json.dumps(_comparable(cfg), sort_keys=True).encode()).hexdigest()[:8]


def run_dir(runs: str, cfg, stage: str) -> Path:
    return Path(runs) / cfg.dataset / f"{stage}-{config_hash(cfg)}"


def main_guard(fn):
    """Run a CLI entry point: ValueError / FileNotFoundError become one line on stderr, exit 2;
    a graceful stop (see StopRequest) one line, exit 130."""
    try:
        fn()
    except (ValueError, FileNotFoundError, PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Stopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(130)


# ------------------------------------------------------------------------------------- checkpoints
def checkpoint(path: Path, state: dict):
    """Atomic: torch.save to a per-process temp file in the same folder (ranks may write the same file),
    then os.replace; temp files left by killed writers are removed (datafiles.write_atomic)."""
    write_atomic(path, lambda tmp: torch.save(state, tmp))


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
    if cfg is not None and state["config"] != _comparable(cfg):
        diff = [k for k in set(state["config"]) | set(_comparable(cfg))
                if state["config"].get(k) != _comparable(cfg).get(k)]
        raise ConfigError(f"checkpoint {path} was written by another config (differs in "
                          f"{', '.join(sorted(diff))}); use --fresh or another --runs folder")
    return state


def _comparable(cfg) -> dict:
    """The config fields that change a result (not where data lives or how often we log)."""
    return {k: v for k, v in asdict(cfg).items() if k not in NOT_HASHED}


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


def check_writable(folder: Path):
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"       # one per process: torchrun's ranks race
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"run directory {folder} is not writable ({e.strerror}); pass --runs DIR")


# --------------------------------------------------------------------------------------- utilities
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
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return dist.get_rank(), dist.get_world_size()


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


def match_optimizer(opt, graph: bool, cuda: bool):
    """After loading an optimiser state saved in the other mode (load_state_dict brings back the
    saved param groups): for a CUDA graph the learning rate a tensor and the groups capturable,
    otherwise a number and not capturable."""
    for group in opt.param_groups:
        lr = float(group["lr"])
        group["lr"] = torch.tensor(lr, device=group["params"][0].device) if graph else lr
        group["capturable"] = graph and cuda


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


# ------------------------------------------------------------------------------------------- loop
class Stopped(KeyboardInterrupt):
    """Training stopped on a signal after writing its checkpoint."""


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
    graph captures (GraphStep); zeroing the gradients and the LR / EMA-decay schedules stay outside.
    The loss is a scalar, or one per arm [A] for a stacked model (their sum is minimised)."""
    with torch.autocast("cuda", torch.bfloat16, enabled=cuda, cache_enabled=autocast_cache):
        loss = loss_fn(net, step, gen)
    loss.sum().backward()
    clip(params)
    opt.step()
    ema.apply()
    return loss.detach()


class GraphStep:
    """train_step captured once in a CUDA graph and replayed (`--cuda-graph true`; CUDA, one process).

    The eager step launches ~1,700 small kernels from Python and the GPU mostly waits for the host
    (bench/profile_step_h100.txt); a replay launches them all at once (bench/graph_probe_h100.txt:
    1.5–4.3× faster on an H100, the most at small batches). PyTorch's whole-network recipe, and
    what it asks of the code:
    * the optimiser from `optimizer(..., graph=True)` (capturable, tensor learning rate) and the EMA's
      tensor decay, both set on the host before each replay;
    * loss_fn free of host syncs and shape changes (no .item(), no boolean-mask indexing) and of
      `step`, which capture freezes; its batch is drawn with `gen`, registered with the graph so
      every replay draws new numbers and checkpoints keep the generator's state;
    * the first WARMUP steps run eagerly on a side stream, so lazy state (AdamW's moments, cuBLAS
      workspaces) exists before capture; they are real training steps. Gradients are left as None
      before capture, so the captured backward writes them afresh on every replay.
    `capture=False` keeps every step on the warm-up path (what the CPU tests check)."""

    WARMUP = 3

    def __init__(self, net, loss_fn, gen, opt, sched, ema, params, clip, capture=True):
        self.net, self.loss_fn, self.gen, self.opt, self.sched, self.ema = net, loss_fn, gen, opt, sched, ema
        self.params, self.clip, self.capture = params, clip, capture
        self.graph, self.loss, self.warm = None, None, 0

    def body(self, step) -> torch.Tensor:
        return optimise(self.net, self.loss_fn, step, self.gen, self.opt, self.ema, self.params, self.clip,
                        cuda=self.ema.decay.is_cuda, autocast_cache=False)   # no cast cache across replays

    def __call__(self, step) -> torch.Tensor:
        self.ema.set_decay(step)
        if not self.capture or self.warm < self.WARMUP:
            self.opt.zero_grad(set_to_none=True)
            if self.capture:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    loss = self.body(step)
                torch.cuda.current_stream().wait_stream(side)
            else:
                loss = self.body(step)
            self.warm += 1
        else:
            if self.graph is None:
                self.opt.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
                self.graph = torch.cuda.CUDAGraph()
                for gen in self.gen if isinstance(self.gen, list) else [self.gen]:
                    self.graph.register_generator_state(gen)
                try:
                    with torch.cuda.graph(self.graph):
                        self.loss = self.body(step)
                except RuntimeError as e:    # the last checkpoint stays; the eager step trains the same
                    raise ConfigError(f"capturing the training step in a CUDA graph failed ({e}); "
                                      "rerun with --cuda-graph false") from e
            self.graph.replay()
            loss = self.loss
        self.sched.step()
        return loss


def make_step(net, loss_fn, gen, opt, sched, ema, params, clip, cuda, graph=False):
    """The loop's step as a callable step -> detached loss: train_step, or with graph a GraphStep."""
    if graph:
        return GraphStep(net, loss_fn, gen, opt, sched, ema, params, clip)
    return lambda step: train_step(net, loss_fn, step, gen, opt, sched, ema, params, clip, cuda)


def train(model: torch.nn.Module, loss_fn, cfg: TrainConfig, out: Path, *, stage_cfg=None,
          params=None, sample_fn=None, device="cpu", desc="train", arm_seeds=None) -> dict:
    """Train `params` (default: all of model's) by minimising loss_fn(model, step, generator).

    loss_fn draws its own batch with the given torch.Generator (seeded, saved in checkpoints, so a
    resumed run sees the same batches as an uninterrupted one). Resumes from out/ckpt.pt when its
    config matches `stage_cfg` (default cfg). Leaves the EMA weights in `model` and returns
    {"step", "loss", "seconds", "img_per_s"}. sample_fn(model, out) is called with EMA weights at
    every checkpoint (e.g. to write samples.png).
    A stacked model (stack.Stacked) passes arm_seeds, one per arm: loss_fn then gets a list of A
    generators (arm a's seeded as a lone run of seed arm_seeds[a] would be) and returns the A losses
    [A]; gradients are clipped per arm, and "arm_loss" is returned and logged beside their mean."""
    check_train_config(cfg)
    stage_cfg = stage_cfg or cfg
    rank, world = distributed()
    out = Path(out)
    params = [p for p in (params or model.parameters()) if p.requires_grad]
    cuda = str(device).startswith("cuda")
    graph = cfg.cuda_graph and cuda
    if graph and world > 1:
        raise ConfigError("--cuda-graph true trains in one process only (not under torchrun)")
    if arm_seeds is not None and world > 1:
        raise ConfigError("stacked arms train in one process (not under torchrun)")
    opt, sched = optimizer(params, cfg, cuda, graph)
    ema = EMA(params, cfg.ema_decay)
    gens = [torch.Generator(device).manual_seed(seed * 1000 + rank) for seed in (arm_seeds or [cfg.seed])]
    gen = gens if arm_seeds is not None else gens[0]
    step, ckpt = 0, out / "ckpt.pt"
    if ckpt.exists():
        state = load_checkpoint(ckpt, stage_cfg, map_location=device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        match_optimizer(opt, graph, cuda)     # the checkpoint may come from a run with(out) --cuda-graph
        sched.load_state_dict(state["sched"])
        for s, v in zip(ema.shadow, state["ema"]):
            s.copy_(v)
        if len(state["gen"]) != world * len(gens):
            raise ConfigError(f"checkpoint {ckpt} holds {len(state['gen'])} batch generators, not {world * len(gens)} "
                              f"({world} process(es) x {len(gens)} arm(s)); resume with as many or pass --fresh")
        for g, saved in zip(gens, state["gen"][rank:] if arm_seeds is None else state["gen"]):
            g.set_state(saved.to("cpu") if cuda else saved)
        step = state["step"]
        if rank == 0:
            truncate_log(out / "log.jsonl", step)
        if step < cfg.steps and rank == 0:
            print(f"resuming {out} from step {step}")
    if step < cfg.steps:            # a finished run writes nothing, so it may sit in a read-only folder
        check_writable(out)
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[torch.cuda.current_device()] if cuda else None)
    if cfg.compile and cuda:
        net = torch.compile(net)
    clip = gradient_clip(cfg, per_arm=arm_seeds is not None)
    take_step = make_step(net, loss_fn, gen, opt, sched, ema, params, clip, cuda, graph)
    snapshots = snapshot_steps(cfg)

    def save(last_loss):
        states = [g.get_state() for g in gens]
        if world > 1:  # every rank's batch generator, so a resume is exact
            states = [torch.empty_like(states[0]) for _ in range(world)]
            dist.all_gather_object(states, gens[0].get_state())
        if rank != 0:
            return
        raw = {k: v.detach().clone() for k, v in model.state_dict().items()}
        ema.copy_to(params)  # write samples with the EMA weights, then put the raw ones back
        ema_model = {k: v.detach().clone() for k, v in model.state_dict().items()}
        checkpoint(ckpt, {"config": _comparable(stage_cfg), "step": step, "model": raw, "ema_model": ema_model,
                          "ema": ema.shadow, "opt": opt.state_dict(), "sched": sched.state_dict(),
                          "gen": states, "loss": last_loss})
        if step in snapshots:
            checkpoint(out / f"ema_step{step}.pt", {"config": _comparable(stage_cfg), "step": step,
                                                    "ema_model": ema_model})
        if sample_fn is not None:
            model.eval()
            sample_fn(model, out)
            model.train()
            if graph:  # the graph's private memory pool stays reserved: give sampling's back
                torch.cuda.empty_cache()
        model.load_state_dict(raw)

    log = open(out / "log.jsonl", "a") if rank == 0 and step < cfg.steps else None
    bar = tqdm(total=cfg.steps, initial=step, desc=desc, disable=rank != 0, dynamic_ncols=True)
    finite = torch.ones((), dtype=torch.bool, device=device)
    loss_sum = torch.zeros(() if arm_seeds is None else len(arm_seeds), device=device)   # [] or [A]
    last_loss, t0, t_start, start, last_log = float("nan"), time.perf_counter(), time.perf_counter(), step, step
    arm_loss = []
    model.train()
    one_main_thread = world == 1 and threading.current_thread() is threading.main_thread()
    with StopRequest(one_main_thread) as stop:  # Ctrl-C / SIGTERM: finish the step, checkpoint, stop
        while step < cfg.steps:
            loss = take_step(step)
            finite &= torch.isfinite(loss).all()
            loss_sum += loss.float()
            step += 1
            stopping = stop.requested  # read once: a signal between the checks below waits a step
            saving = step % cfg.ckpt_every == 0 or step == cfg.steps or stopping or step in snapshots
            if step % cfg.log_every == 0 or saving:     # the finite check comes before every save
                if world > 1:  # the global batch's loss (not rank 0's share); every rank stops together
                    total = torch.stack([loss_sum / world, (~finite).float()])
                    dist.all_reduce(total)
                    loss_sum, finite = total[0], total[1] == 0
                if not finite:  # stop before the next checkpoint: the last good one stays intact
                    raise FloatingPointError(f"non-finite loss before step {step}; the last good "
                                             f"checkpoint {ckpt} is intact (lower --lr?)")
                n, last_log = step - last_log, step                    # steps summed since the last log
                arm_loss = (loss_sum / n).tolist()
                last_loss = loss_sum.mean().item() / n
                loss_sum.zero_()
                dt = time.perf_counter() - t0
                t0 = time.perf_counter()
                if log:
                    row = {"step": step, "loss": last_loss, "lr": float(sched.get_last_lr()[0]),
                           "img_per_s": n * cfg.batch_size * len(gens) / dt}
                    log.write(json.dumps(row if arm_seeds is None else {**row, "arm_loss": arm_loss}) + "\n")
                    log.flush()
                bar.set_postfix(loss=f"{last_loss:.4f}")
            bar.update(1)
            if saving:
                save(last_loss)
            if stopping:
                bar.close()
                if log:
                    log.close()
                raise Stopped(f"at step {step} of {cfg.steps}; checkpoint {ckpt} written, "
                              f"run the same command again to resume")
    bar.close()
    if log:
        log.close()
    if graph:  # free the graph and its memory pool, where the gradients live
        opt.zero_grad(set_to_none=True)
        take_step = None
    seconds = time.perf_counter() - t_start
    if world > 1:  # wait for rank 0's last checkpoint, so every rank returns its EMA weights
        dist.barrier()
    if ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=True)
        model.load_state_dict(state["ema_model"])
        last_loss = state["loss"]
    trained = step - start
    stats = {"step": step, "loss": last_loss, "seconds": seconds,
             "img_per_s": trained * cfg.batch_size * len(gens) / seconds if trained else float("nan")}
    return stats if arm_seeds is None else {**stats, "arm_loss": arm_loss}

