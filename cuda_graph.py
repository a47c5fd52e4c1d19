"""An optional accelerator for train.py's loop: the training step captured once in a CUDA graph and
replayed (`--cuda-graph true`; CUDA, one process; the command-line default on one GPU). And the same
for sampling: the denoiser's forward captured once per input shape (GraphDenoiser).

The step body is train.optimise, the same one the eager loop runs:

    forward (bf16 autocast) → loss.sum().backward() → clip → AdamW.step() → EMA

Zeroing the gradients and the schedules (learning rate, EMA decay) stay on the host, around each replay.
The eager step launches ~1,700 small kernels from Python and the GPU mostly waits for the host
(bench/profile_step_h100.txt); a replay launches them all at once (bench/graph_probe_h100.txt:
1.5–4.3× faster on an H100, the most at small batches). PyTorch's whole-network recipe, and what it
asks of the code:
* the optimiser from `train.optimizer(..., graph=True)` (capturable, tensor learning rate) and the EMA's
  tensor decay, both set on the host before each replay;
* loss_fn free of host syncs and shape changes (no .item(), no boolean-mask indexing) and of
  `step`, which capture freezes; its batch is drawn with `gen`, registered with the graph so
  every replay draws new numbers and checkpoints keep the generator's state;
* the first WARMUP steps run eagerly on a side stream, so lazy state (AdamW's moments, cuBLAS
  workspaces) exists before capture; they are real training steps. Gradients are left as None
  before capture, so the captured backward writes them afresh on every replay.
"""
import torch

from config import ConfigError


class GraphStep:
    """step -> detached loss: body(step) run eagerly for WARMUP steps, then captured once and replayed.
    body does forward, backward, clip, AdamW and EMA (train.optimise); opt, sched and ema are the ones
    it uses, gen its batch generator (a list of them for stacked arms). `capture=False` keeps every
    step on the warm-up path, without a side stream (what the CPU tests run)."""

    WARMUP = 3

    def __init__(self, body, opt, sched, ema, gen, capture=True):
        self.body, self.opt, self.sched, self.ema, self.gen = body, opt, sched, ema, gen
        self.capture, self.graph, self.loss, self.warm = capture, None, None, 0

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

    def close(self):
        """Free the graph and its private memory pool, where the gradients live."""
        self.opt.zero_grad(set_to_none=True)
        self.graph = self.loss = None


def match_optimizer(opt, graph: bool, cuda: bool):
    """After loading an optimiser state saved in the other mode (load_state_dict brings back the
    saved param groups): for a CUDA graph the learning rate a tensor and the groups capturable,
    otherwise a number and not capturable."""
    for group in opt.param_groups:
        lr = float(group["lr"])
        group["lr"] = torch.tensor(lr, device=group["params"][0].device) if graph else lr
        group["capturable"] = graph and cuda


class GraphDenoiser:
    """model(z, t, cond) captured in a CUDA graph once per input shape (and autocast state) and replayed,
    for ddpm.sample_latents' loop: its inputs are copied into the graph's static tensors and its
    output is returned as a copy, so a replay never overwrites what the caller still holds. Two eager
    calls on a side stream before each capture create lazy state (cuBLAS workspaces, cuDNN plans).
    `capture=False` runs the same copies around a plain call (what the CPU tests run)."""

    WARMUP = 2

    def __init__(self, model, capture=True):
        self.model, self.capture, self.graphs = model, capture, {}
        if hasattr(model, "num_classes"):                    # CFG's null class, as sample_latents reads it
            self.num_classes = model.num_classes

    def __call__(self, z, t, cond=None):
        key = (tuple(z.shape), z.dtype, cond is None, torch.is_autocast_enabled("cuda"))
        if key not in self.graphs:
            static = [None if x is None else x.clone(memory_format=torch.contiguous_format) for x in (z, t, cond)]
            graph, out = None, None
            if self.capture:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(self.WARMUP):
                        self.model(*static)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    out = self.model(*static)
            self.graphs[key] = (graph, static, out)
        graph, static, out = self.graphs[key]
        for buffer, x in zip(static, (z, t, cond)):
            if x is not None:
                buffer.copy_(x)
        if graph is None:
            return self.model(*static)
        graph.replay()
        return out.clone()
