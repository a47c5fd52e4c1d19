"""Stacked arms: the A fine-tunes of one sweep trained and sampled as one model (torch.func.vmap).

An arm is one fine-tune of a sweep (an α, a seed, a training subset). Arms that share a base model
share its architecture, so their trainable tensors stack along a new leading arm axis,

    θ = [θ_1; …; θ_A]                               every trainable tensor [A, *shape]

and one call evaluates every arm on its own inputs, with vmap over functional_call:

    Stacked(z, t, c)[a] = f(θ_a; z[a], t[a], c[a])   z [A, B, c, h, w] -> [A, B, c, h, w]

Why this is exactly A separate fine-tunes:
* the loss is the sum of the arms' losses, L(θ) = Σ_a L_a(θ_a), so ∂L/∂θ_a = ∂L_a/∂θ_a;
* AdamW, its weight decay and the EMA act element by element, so one optimiser over the stacked
  tensors takes every arm's own step;
* gradient clipping by norm is the one coupling step, so it is done per arm (`clip_per_arm`):
  g_a ← g_a · min(1, c / (‖g_a‖ + 1e-6)), ‖g_a‖ over arm a's tensors only (torch's formula);
* each arm draws its batches from its own seeded generator (train.train with arm_seeds).
So the stack ends where A lone runs of its dtype end, up to the rounding of other summation orders
(tests/test_stack.py compares them in float64); on a GPU a lone run trains under bf16 autocast
instead (see Precision).
Tensors no arm trains (the frozen base under LoRA) are not stacked: every arm reads the one copy in
the template (vmap's in_dims None), so a frozen convolution runs as one plain convolution over A·B
images instead of a grouped one, and costs no memory per arm.

Random ops inside the network are refused (randomness="error": the UNet's dropout is 0 in every
preset), so the stacked forward draws no numbers the separate runs would not.

Precision: the stacked forward runs in float32 (on TF32 tensor cores where the caller allows them, as
ddm.py and bench_sweep.py do) with the math attention kernel; a stack converted with .double() runs in
float64 throughout (inputs, forward, per-arm clipping), which is how tests/test_stack.py compares it
with lone runs. Under vmap, bf16 autocast does not reach the convolutions (a bf16 activation meets
float32 weights), and the fused attention kernels reject vmap's strides in the backward pass.
"""
import copy

import torch
import torch.nn as nn
from torch.func import functional_call, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel


LATENTS_PER_PASS = 16384   # latents in one stacked forward pass, all arms (and both CFG passes) together


def arm_batch(num_arms: int, passes: int = 1) -> int:
    """Latents per arm in one stacked forward pass of `passes` copies (2 under CFG)."""
    return max(1, LATENTS_PER_PASS // (num_arms * passes))


class Stacked(nn.Module):
    """A copies of one architecture whose trainable tensors carry a leading arm axis.

    arms: modules of one class and structure (e.g. fine-tunes of one base), each with the same
    parameters frozen. The frozen ones are taken from arms[0] (they must be equal in every arm)."""

    def __init__(self, arms: list):
        super().__init__()
        if not arms:
            raise ValueError("Stacked needs at least one arm")
        self.num_arms = len(arms)
        self.names = [n for n, p in arms[0].named_parameters() if p.requires_grad]
        named = [dict(m.named_parameters()) for m in arms]
        if any([n for n, p in m.items() if p.requires_grad] != self.names for m in named) or any(
                m.keys() != named[0].keys() for m in named) or any(list(m.buffers()) for m in arms):
            raise ValueError("Stacked needs arms of one structure, the same tensors trained, and no buffers")
        for name, p in named[0].items():
            if not p.requires_grad and any(not torch.equal(p, other[name]) for other in named[1:]):
                raise ValueError(f"frozen tensor {name} differs between arms; only trained tensors may differ")
        self.stacked = nn.ParameterList(
            nn.Parameter(torch.stack([m[name].detach() for m in named])) for name in self.names)   # [A, *shape]
        self.template = copy.deepcopy(arms[0]).requires_grad_(False)   # the structure and the frozen tensors

    def forward(self, *inputs):
        """Every input carries the arm axis first ([A, B, …]); so does every output."""
        def one_arm(theta, *x):
            return functional_call(self.template, dict(zip(self.names, theta)), x)
        dtype = next(self.template.parameters()).dtype                              # float32 unless converted
        inputs = [x.to(dtype) if torch.is_tensor(x) and x.is_floating_point() else x for x in inputs]
        with torch.autocast("cuda", enabled=False), sdpa_kernel(SDPBackend.MATH):    # see Precision
            return vmap(one_arm, randomness="error")(tuple(self.stacked), *inputs)

    @torch.no_grad()
    def arm(self, a: int) -> nn.Module:
        """Arm a as a plain module (a copy, with its own trained tensors, trainable again)."""
        module = copy.deepcopy(self.template)
        params = dict(module.named_parameters())
        for name, theta in zip(self.names, self.stacked):
            params[name].copy_(theta[a]).requires_grad_(True)
        return module


@torch.no_grad()
def clip_per_arm(params, max_norm: float):
    """Clip each arm's gradient to norm max_norm over that arm's tensors (axis 0 of every tensor)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    if len({g.shape[0] for g in grads}) != 1:
        raise ValueError("clip_per_arm: every gradient needs the same leading arm axis")
    acc = torch.promote_types(grads[0].dtype, torch.float32)     # at least float32; float64 grads stay float64
    norms = torch.stack([g.flatten(1).to(acc).square().sum(1) for g in grads]).sum(0).sqrt()   # [A]
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)                                         # [A]
    for g in grads:
        g.mul_(coef.view(-1, *[1] * (g.dim() - 1)).to(g.dtype))
