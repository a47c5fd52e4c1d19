"""Configuration: the training fields every stage shares, the command line built from a stage's config,
the config hash that names run folders, and the checks that turn a bad flag into one line.

A stage's config is a dataclass that extends TrainConfig (and data.DataConfig): vae.VAEConfig,
ddpm.DiffusionConfig, ddm.DDMConfig, invdiff.InvDiffConfig. From such a class:

    parse_config(cls, presets)   argparse with one flag per field (batch_size -> --batch-size; booleans take
                                 true/false), then the preset (--preset tiny|small|full), then the flags given
    explicit_flags(cls, args)    the fields given on the command line (they beat any preset)
    comparable(cfg)              the fields that can change a result (not NOT_HASHED: where the data lives,
                                 how often to log or checkpoint, how a step runs)
    config_hash(cfg)             the first 8 hex digits of sha1(json(comparable(cfg))); a stage trains in
                                 runs/<dataset>/<stage>-<hash>, so a later stage finds an earlier one by its config

A mistake the user can fix raises ConfigError; `main_guard` prints it as one line `error: …` (exit 2),
and a training run stopped by a signal (Stopped, after its checkpoint) as `stopped: …` (exit 130).
"""
import argparse
import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

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
    cuda_graph: str = "auto"       # auto | true | false: replay the step from one CUDA graph (see use_cuda_graph)
    snapshots: str = ""            # steps at which the EMA weights are also kept, as ema_step<N>.pt


class ConfigError(ValueError):
    """A bad flag, file or state; the CLI prints its one line and exits 2."""


class Stopped(KeyboardInterrupt):
    """Training stopped on a signal after writing its checkpoint."""


def main_guard(fn):
    """Run a CLI entry point: ValueError / FileNotFoundError become one line on stderr, exit 2;
    a graceful stop (Stopped) one line, exit 130."""
    try:
        fn()
    except (ValueError, FileNotFoundError, PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Stopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(130)


# -------------------------------------------------------------------------------------- command line
class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line through main_guard instead of usage + message
        raise ConfigError(f"{message} (see --help)")


def parse_bool(s: str) -> bool:
    if s.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")
    return s.lower() in ("true", "1", "yes")


def parse_config(cls, presets: dict, argv=None, description=""):
    """Build argparse from the dataclass fields, apply the preset, then the explicit flags.

    Flags are the field names with '-' for '_'; booleans take true/false; a preset is a dict of
    field values (`--preset tiny|small|full`, default small on a GPU and tiny otherwise).
    Returns (cfg, args) where args also holds --preset, --fresh, --runs and --device."""
    p = Parser(description=description)
    p.add_argument("--preset", choices=PRESETS, default=None)
    p.add_argument("--fresh", action="store_true", help="retrain every stage instead of reusing")
    p.add_argument("--runs", default="runs", help="where run directories go")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    for f in fields(cls):
        if f.name in FILLED_IN:
            continue
        kind = {bool: parse_bool, int: int, float: float}.get(type(f.default), str)
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None, help=f"default {f.default!r}")
    args = p.parse_args(argv)
    os.environ["FAIRDIFF_RUNS"] = args.runs           # the run root, where data.py caches decoded images
    args.device = check_device(args.device)
    if args.preset is None:
        args.preset = "small" if args.device.startswith("cuda") else "tiny"
    values = dict(presets.get(args.preset, {}))
    values.update(explicit_flags(cls, args))
    cfg = cls(**values)
    cuda = args.device.startswith("cuda")
    graph = isinstance(cfg, TrainConfig) and use_cuda_graph(cfg, cuda, world_size())
    print(f"preset {args.preset} on {args.device}" + ("" if cuda else " (no GPU: use --preset small on a GPU)")
          + (" with CUDA graphs (--cuda-graph false: eager)" if graph else ""))
    return cfg, args


def world_size() -> int:
    """Processes in this run: torchrun's WORLD_SIZE, else 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def use_cuda_graph(cfg: TrainConfig, cuda: bool, world: int) -> bool:
    """Whether train() replays its step from one CUDA graph. `auto` (the default, from code and from the
    command line alike): on for one CUDA process unless --compile is on; every train() stage has trained
    as a graph on an H100 and an H200, and a captured step is 1.5–4.3× faster than the eager one
    (bench/README.md). `true` asks for it (refused under torchrun), `false` never; on a CPU it is off."""
    mode = cuda_graph_mode(cfg)
    if mode == "true" and world > 1:
        raise ConfigError("--cuda-graph true trains in one process only (not under torchrun)")
    return cuda and world == 1 and (mode == "true" or (mode == "auto" and not cfg.compile))


def cuda_graph_mode(cfg: TrainConfig) -> str:
    """--cuda-graph as auto | true | false (anything else is refused by check_train_config)."""
    return str(cfg.cuda_graph).lower()                             # True / False from code read as true / false


def explicit_flags(cls, args) -> dict:
    """The config fields the user set on the command line (they beat any preset)."""
    return {f.name: getattr(args, f.name) for f in fields(cls)
            if f.name not in FILLED_IN and getattr(args, f.name) is not None}


def runtime_flags(cfg) -> dict:
    """The RUNTIME flags of cfg, for the stages it builds on (autoencoder, base model)."""
    return {k: getattr(cfg, k) for k in RUNTIME}


def from_fields(cls, values: dict):
    """cls built from the entries of values that are fields of cls (the others are ignored): a DataConfig
    from a stage's config, or a stage's config from the `config` a checkpoint holds."""
    return cls(**{k: v for k, v in values.items() if k in cls.__dataclass_fields__})


# ------------------------------------------------------------------------------------------ hashing
def comparable(cfg) -> dict:
    """The config fields that change a result (not where data lives or how often we log)."""
    return {k: v for k, v in asdict(cfg).items() if k not in NOT_HASHED}


def config_hash(cfg) -> str:
    """8 hex digits of the config (fields that cannot change the result are skipped)."""
    return hashlib.sha1(json.dumps(comparable(cfg), sort_keys=True).encode()).hexdigest()[:8]


# ------------------------------------------------------------------------------------------- checks
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


def device_name(device) -> str:
    """The GPU's name (e.g. 'NVIDIA H200') for a CUDA device, else 'cpu': what reports say they ran on."""
    return torch.cuda.get_device_name(device) if str(device).startswith("cuda") else "cpu"


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
    if cuda_graph_mode(cfg) not in ("auto", "true", "false"):
        raise ConfigError(f"--cuda-graph {cfg.cuda_graph!r}: choose auto, true or false")
    if cfg.compile and cuda_graph_mode(cfg) == "true":
        raise ConfigError("--compile true and --cuda-graph true: choose one (both remove launch overhead)")
    if cfg.grad_clip_mode not in ("norm", "value"):
        raise ConfigError(f"--grad-clip-mode {cfg.grad_clip_mode!r}: choose norm or value")
    try:
        snapshot_steps(cfg)
    except ValueError:
        raise ConfigError(f"--snapshots {cfg.snapshots!r}: expected comma-separated step numbers, e.g. 250,500")


def snapshot_steps(cfg: TrainConfig) -> set:
    """--snapshots '250,500' -> {250, 500}: the steps whose EMA weights are kept beside the checkpoint."""
    return {int(s) for s in cfg.snapshots.split(",") if s.strip()}


def check_writable(folder: Path):
    """folder (created if absent) takes new files, or one line saying it does not."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"       # one per process: torchrun's ranks race
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"run directory {folder} is not writable ({e.strerror}); pass --runs DIR")
