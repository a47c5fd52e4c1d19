"""Tests for the training loop (train.py): kill / signal and resume give the uninterrupted weights,
the log lists each step once, a non-finite loss keeps the last checkpoint, checkpoints are atomic, the EMA
is its formula; and its CUDA-graph step (cuda_graph.py): the same body as the eager step, a one-line error
when capture fails, on by default on one GPU only, and (on a GPU) the same training as the eager loop.

Every test runs on CPU in seconds with a tiny UNet on fixed random latents (the GPU test skips without one)."""
import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the repo's flat modules without installing
import config  # noqa: E402
import ddpm  # noqa: E402
import train as train_lib  # noqa: E402
from config import TrainConfig  # noqa: E402
from cuda_graph import GraphStep, match_optimizer  # noqa: E402
from datafiles import save_cache  # noqa: E402
from ddpm import DDPMScheduler, diffusion_loss, drop_labels  # noqa: E402
from unet import UNet  # noqa: E402

torch.set_num_threads(1)   # tiny models: more threads only spin on a shared CPU


def gen(seed):
    return torch.Generator().manual_seed(seed)


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    return UNet(4, (8, 16), num_res_blocks=1, num_classes=2, groups=4)


def tiny_diffusion_task():
    """The base model's loss on fixed random latents: (scheduler, loss_fn(net, step, gen))."""
    sched = DDPMScheduler(num_train_timesteps=100)
    z0, label = torch.randn(32, 4, 8, 8, generator=gen(0)), torch.arange(32) % 2

    def loss_fn(net, step, g):
        idx = torch.randint(32, (8,), generator=g)
        return diffusion_loss(net, sched, z0[idx], drop_labels(label[idx], 2, 0.5, g), g)
    return loss_fn


def assert_same_state(a: dict, b: dict):
    assert a["step"] == b["step"]
    for key in ("model", "ema_model"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    for x, y in zip(a["ema"], b["ema"]):
        assert torch.equal(x, y)
    for k, state in a["opt"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["opt"]["state"][k][name]), ("opt", k, name)
    assert torch.equal(a["gen"][0], b["gen"][0])


def load(path):
    return torch.load(path, weights_only=True)


def test_kill_and_resume_gives_identical_weights(tmp_path):
    loss_fn = tiny_diffusion_task()
    cfg = TrainConfig(steps=6, batch_size=8, lr=1e-3, warmup=2, lr_schedule="cosine", ckpt_every=3, log_every=2)
    train_lib.train(tiny_unet(0), loss_fn, cfg, tmp_path / "straight")

    def killed(net, step, g):
        if step == 3:                                              # after the step-3 checkpoint
            raise KeyboardInterrupt
        return loss_fn(net, step, g)
    with pytest.raises(KeyboardInterrupt):
        train_lib.train(tiny_unet(0), killed, cfg, tmp_path / "resumed")
    assert load(tmp_path / "resumed" / "ckpt.pt")["step"] == 3
    seen = []

    def recording(net, step, g):
        seen.append(step)
        return loss_fn(net, step, g)
    model = tiny_unet(seed=7)                                      # other initial weights: they must be replaced
    train_lib.train(model, recording, cfg, tmp_path / "resumed")
    assert seen == [3, 4, 5]                                       # resumed, not restarted
    straight, resumed = load(tmp_path / "straight" / "ckpt.pt"), load(tmp_path / "resumed" / "ckpt.pt")
    assert_same_state(straight, resumed)
    for k, v in model.state_dict().items():                        # the model is left with the EMA weights
        assert torch.equal(v, straight["ema_model"][k])
    assert not list((tmp_path / "resumed").glob("*.tmp"))


def test_a_resumed_log_has_each_step_once(tmp_path):
    """Killed after logging step 4 but checkpointed at step 3: the rerun drops the row of step 4 and
    logs it again, so log.jsonl lists the steps of an uninterrupted run, each once."""
    loss_fn = tiny_diffusion_task()
    cfg = TrainConfig(steps=6, batch_size=8, lr=1e-3, warmup=2, ckpt_every=3, log_every=2)
    train_lib.train(tiny_unet(0), loss_fn, cfg, tmp_path / "straight")

    def killed(net, step, g):
        if step == 4:                                              # after the row of step 4
            raise KeyboardInterrupt
        return loss_fn(net, step, g)
    with pytest.raises(KeyboardInterrupt):
        train_lib.train(tiny_unet(0), killed, cfg, tmp_path / "resumed")
    steps = lambda run: [json.loads(line)["step"] for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
    assert steps("resumed") == [2, 3, 4]                           # the row after the checkpoint is there
    train_lib.train(tiny_unet(0), loss_fn, cfg, tmp_path / "resumed")
    assert steps("resumed") == steps("straight") == [2, 3, 4, 6]


def steps_of(cfg: TrainConfig, graph: bool, tensor_lr: bool, steps=8) -> dict:
    """`steps` steps of the tiny task through make_step: a GraphStep (graph; never captured, so every step
    takes its eager path) or train_step, with AdamW's learning rate a tensor (tensor_lr) or a number."""
    model = tiny_unet(0)
    params = list(model.parameters())
    start = [p.detach().clone() for p in params]
    opt, sched = train_lib.optimizer(params, cfg, cuda=False, graph=tensor_lr)
    ema, lr = train_lib.EMA(params, cfg.ema_decay), opt.param_groups[0]["lr"]
    step = train_lib.make_step(model, tiny_diffusion_task(), gen(1), opt, sched, ema, params,
                               train_lib.gradient_clip(cfg), cuda=False, graph=graph)
    assert isinstance(step, GraphStep) == graph
    if graph:
        step.capture = False                                       # capture needs CUDA
    lrs = []                                                       # the learning rate after each step
    for s in range(steps):
        step(s)
        lrs.append(float(opt.param_groups[0]["lr"]))
    return {"start": start, "weights": params, "ema": ema.shadow, "opt": opt, "lr_tensor": lr, "lrs": lrs}


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().flatten() for t in tensors])


def lockstep(cfg: TrainConfig, steps=8) -> list:
    """The eager train_step with a float learning rate (a) and GraphStep with a tensor one (b, never
    captured) side by side, b put into a's state before every step: weights, AdamW's moments and step
    count, the EMA and the batch generator (b's LR schedule and EMA decay follow b's own step count).
    -> per step {"before": a's weights before it, "a"/"b": weights after, "ema_a"/"ema_b"}, flat."""
    sides = []
    for graph in (False, True):
        model = tiny_unet(0)
        params = list(model.parameters())
        opt, sched = train_lib.optimizer(params, cfg, cuda=False, graph=graph)
        ema, g = train_lib.EMA(params, cfg.ema_decay), gen(1)
        step = train_lib.make_step(model, tiny_diffusion_task(), g, opt, sched, ema, params,
                                   train_lib.gradient_clip(cfg), cuda=False, graph=graph)
        if graph:
            step.capture = False                                   # capture needs CUDA
        sides.append(dict(params=params, opt=opt, ema=ema, gen=g, step=step))
    a, b = sides
    out = []
    for s in range(steps):
        with torch.no_grad():
            for p, q in zip(a["params"], b["params"]):
                q.copy_(p)
                for key, value in a["opt"].state[p].items():       # empty before the first step
                    b["opt"].state[q][key].copy_(value)
            for x, y in zip(a["ema"].shadow, b["ema"].shadow):
                y.copy_(x)
        b["gen"].set_state(a["gen"].get_state())
        before = flat(a["params"]).clone()
        a["step"](s)
        b["step"](s)
        out.append({"before": before, "a": flat(a["params"]), "b": flat(b["params"]),
                    "ema_a": flat(a["ema"].shadow), "ema_b": flat(b["ema"].shadow)})
    return out


def test_graph_step_body_with_tensor_lr_matches_the_eager_step():
    """GraphStep (what --cuda-graph captures: AdamW whose learning rate is a tensor the schedule fills,
    the EMA decay in a tensor, zero_grad outside the body) trains what the eager train_step trains."""
    cfg = TrainConfig(lr=1e-3, warmup=3, lr_schedule="cosine", steps=10, ema_decay=0.9)   # 8 of 10 steps run
    eager, tensor_lr, graph = (steps_of(cfg, g, t) for g, t in ((False, False), (False, True), (True, True)))
    assert graph["opt"].param_groups[0]["lr"] is graph["lr_tensor"]   # filled in place: a graph reads this tensor
    assert not torch.is_tensor(eager["opt"].param_groups[0]["lr"])
    assert graph["lrs"] == pytest.approx(eager["lrs"]) and max(eager["lrs"]) == pytest.approx(cfg.lr)
    assert 0 < eager["lrs"][-1] < cfg.lr                               # warm-up, then the cosine schedule
    # the same body and the same optimiser: GraphStep is train_step, bit for bit
    for a, b in zip(graph["weights"] + graph["ema"], tensor_lr["weights"] + tensor_lr["ema"]):
        assert torch.equal(a, b)
    # A float and a tensor learning rate run the same AdamW ops (weight decay 0) but for the step size
    # lr / (1 − β1^t): a Python float rounded once to float32, or float32 tensor arithmetic on lr rounded to
    # float32 (the schedule's lr · factor, then the division), at most 2 ulp apart. From the same state (a's
    # weights, moments, EMA and batch generator put into b before every step) the forward and backward are
    # the same ops on the same numbers, so each new weight θ' = θ + u differs by the step size's rounding in
    # the update u, its own rounding and that of the sum, and the EMA s' = d·s + (1 − d)·θ' by that and its
    # own rounding:
    #     |Δθ'| ≤ 4 ε (|θ'| + |θ' − θ|),    |Δs'| ≤ 4 ε (|s'| + |θ'| + |θ' − θ|),    ε the float32 epsilon,
    # on any CPU. Compared step by step, rounding cannot grow through later steps (run apart for 8 steps,
    # AdamW's division by √v turns a rounding difference in a near-zero gradient into a difference of up to
    # the learning rate). A step size 1% off, a schedule a step late or another EMA decay moves the weights
    # by far more.
    eps = torch.finfo(torch.float32).eps
    for s, step in enumerate(lockstep(cfg)):
        update = (step["a"] - step["before"]).abs()
        assert update.max() > 1e-5, s                                  # every step trains
        bound = 4 * eps * (step["a"].abs() + update)
        assert ((step["b"] - step["a"]).abs() <= bound).all(), s
        ema_bound = 4 * eps * (step["ema_a"].abs() + step["a"].abs() + update)
        assert ((step["ema_b"] - step["ema_a"]).abs() <= ema_bound).all(), s
    with pytest.raises(config.ConfigError, match="choose one"):
        config.check_train_config(TrainConfig(compile=True, cuda_graph=True))
    # a checkpoint of either mode resumes in the other: lr and capturable follow the mode
    saved = {False: eager["opt"].state_dict(), True: graph["opt"].state_dict()}
    for mode in (False, True):
        opt, _ = train_lib.optimizer(list(tiny_unet(0).parameters()), cfg, cuda=False, graph=mode)
        opt.load_state_dict(saved[not mode])
        match_optimizer(opt, mode, cuda=True)
        group = opt.param_groups[0]
        assert torch.is_tensor(group["lr"]) == mode and group["capturable"] == mode
        assert float(group["lr"]) == pytest.approx(eager["lrs"][-1])


def test_a_failed_capture_says_how_to_train_eagerly(monkeypatch):
    """Now that --cuda-graph is the GPU default, a capture that CUDA refuses ends in one line naming
    --cuda-graph false (the capture itself is faked here: it needs a GPU)."""
    class FakeGraph:
        def register_generator_state(self, gen):
            pass

    def refused(graph):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", refused)
    model, cfg = tiny_unet(0), TrainConfig(lr=1e-3)
    params = list(model.parameters())
    opt, sched = train_lib.optimizer(params, cfg, cuda=False, graph=True)
    step = train_lib.make_step(model, tiny_diffusion_task(), gen(1), opt, sched, train_lib.EMA(params, cfg.ema_decay),
                               params, train_lib.gradient_clip(cfg), cuda=False, graph=True)
    step.warm = step.WARMUP                                            # straight to the capture
    with pytest.raises(config.ConfigError, match="stream is capturing.*rerun with --cuda-graph false"):
        step(0)


def test_cuda_graph_default_is_auto_from_code_and_command_line_alike(monkeypatch):
    """--cuda-graph is `auto` in the dataclass and on the command line alike, and auto replays the step
    from a graph for one CUDA process only: not on a CPU, under torchrun, or with --compile true. (A
    machine with two GPUs is faked for the parser: --device cuda is refused without one.)"""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)

    def parsed(*argv):
        return config.parse_config(ddpm.DiffusionConfig, {}, list(argv))[0]
    assert parsed("--device", "cuda").cuda_graph == parsed("--device", "cpu").cuda_graph == TrainConfig().cuda_graph == "auto"
    use = config.use_cuda_graph
    assert use(TrainConfig(), cuda=True, world=1)
    assert not use(TrainConfig(), cuda=False, world=1)
    assert not use(TrainConfig(), cuda=True, world=2)
    assert not use(TrainConfig(compile=True), cuda=True, world=1)
    assert not use(parsed("--device", "cuda", "--cuda-graph", "false"), cuda=True, world=1)
    assert use(TrainConfig(cuda_graph=True), cuda=True, world=1)            # a bool from code reads as true
    with pytest.raises(config.ConfigError, match="one process only"):
        use(TrainConfig(cuda_graph="true"), cuda=True, world=2)
    with pytest.raises(config.ConfigError, match="choose auto, true or false"):
        config.check_train_config(TrainConfig(cuda_graph="yes"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_training_matches_eager_and_resumes(tmp_path):
    """On a GPU, --cuda-graph trains what the eager loop trains (same batches and noise: the
    registered generator keeps the stream), and a run stopped mid-way and resumed (eager warm-up,
    capture again) ends where the uninterrupted graph run did."""
    sched = DDPMScheduler(num_train_timesteps=100)
    z0, label = torch.randn(64, 4, 8, 8, generator=gen(0)).cuda(), (torch.arange(64) % 2).cuda()

    def loss_fn(net, step, g):
        idx = torch.randint(64, (16,), generator=g, device="cuda")
        return diffusion_loss(net, sched, z0[idx], drop_labels(label[idx], 2, 0.5, g), g)
    common = dict(steps=12, batch_size=16, lr=1e-3, warmup=3, lr_schedule="cosine", ckpt_every=6, log_every=2)
    for name, graph in (("eager", False), ("graph", True)):
        train_lib.train(tiny_unet(0).cuda(), loss_fn, TrainConfig(**common, cuda_graph=graph), tmp_path / name,
                        device="cuda")
    asked = []

    def stop_once(model, out):                   # at the step-6 checkpoint: a Ctrl-C, honoured after step 7
        if not asked:
            asked.append(True)
            signal.raise_signal(signal.SIGINT)
    cfg = TrainConfig(**common, cuda_graph=True)
    with pytest.raises(config.Stopped):
        train_lib.train(tiny_unet(0).cuda(), loss_fn, cfg, tmp_path / "resumed", sample_fn=stop_once, device="cuda")
    assert load(tmp_path / "resumed" / "ckpt.pt")["step"] == 7
    train_lib.train(tiny_unet(0).cuda(), loss_fn, cfg, tmp_path / "resumed", device="cuda")
    eager, graph, resumed = (load(tmp_path / n / "ckpt.pt") for n in ("eager", "graph", "resumed"))
    assert torch.equal(graph["gen"][0], resumed["gen"][0]) and torch.equal(eager["gen"][0], graph["gen"][0])
    for other in (eager, resumed):
        for k, v in graph["model"].items():
            assert torch.allclose(v, other["model"][k], rtol=1e-3, atol=1e-5), k


def test_ema_is_the_formula():
    p = torch.nn.Parameter(torch.tensor([2.0]))
    ema = train_lib.EMA([p], max_decay=0.5)
    p.data.fill_(4.0)
    ema.set_decay(step=0)                                            # decay min(0.5, 1/10) = 0.1
    ema.apply()
    assert ema.shadow[0].item() == pytest.approx(0.1 * 2 + 0.9 * 4)
    ema.set_decay(step=100)                                          # decay 0.5
    ema.apply()
    assert ema.shadow[0].item() == pytest.approx(0.5 * (0.1 * 2 + 0.9 * 4) + 0.5 * 4)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_checkpoints_at_the_step_and_resumes_exactly(tmp_path, signum):
    """Ctrl-C / SIGTERM mid-run: the step finishes, a checkpoint is written there (not at the last
    ckpt_every), the run stops with Stopped, and rerunning gives the uninterrupted weights."""
    loss_fn = tiny_diffusion_task()
    cfg = TrainConfig(steps=6, batch_size=8, lr=1e-3, warmup=2, ckpt_every=6, log_every=1)
    train_lib.train(tiny_unet(0), loss_fn, cfg, tmp_path / "straight")

    def signalled(net, step, g):
        if step == 3:
            os.kill(os.getpid(), signum)                           # arrives inside step 3
        return loss_fn(net, step, g)
    previous = signal.getsignal(signum)
    with pytest.raises(config.Stopped, match="at step 4 of 6"):
        train_lib.train(tiny_unet(0), signalled, cfg, tmp_path / "resumed")
    assert signal.getsignal(signum) is previous                    # the handler is put back
    assert load(tmp_path / "resumed" / "ckpt.pt")["step"] == 4
    train_lib.train(tiny_unet(0), loss_fn, cfg, tmp_path / "resumed")
    assert_same_state(load(tmp_path / "straight" / "ckpt.pt"), load(tmp_path / "resumed" / "ckpt.pt"))


def test_nan_loss_raises_and_keeps_the_last_checkpoint(tmp_path):
    loss_fn, out, on_disk = tiny_diffusion_task(), tmp_path / "run", {}

    def poisoned(net, step, g):
        loss = loss_fn(net, step, g)
        if step == 3:                                              # the step-2 checkpoint is on disk
            on_disk["bytes"] = (out / "ckpt.pt").read_bytes()
            return loss * float("nan")
        return loss
    cfg = TrainConfig(steps=10, batch_size=8, lr=1e-3, warmup=1, ckpt_every=2, log_every=100)
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        train_lib.train(tiny_unet(), poisoned, cfg, out)
    assert (out / "ckpt.pt").read_bytes() == on_disk["bytes"]
    assert load(out / "ckpt.pt")["step"] == 2
    assert not list(out.glob("*.tmp"))


def test_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_cache({"config": {"a": 1}, "w": torch.ones(3)}, path)
    before = path.read_bytes()

    def crash_mid_write(obj, f):
        Path(f).write_bytes(before[:10])                           # a partial file, then the crash
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(OSError):
        save_cache({"config": {"a": 2}, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert torch.equal(train_lib.load_checkpoint(path)["w"], torch.ones(3))
