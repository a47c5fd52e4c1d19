"""InvDiff's environments, inferred without annotations (Hou et al. 2024, arXiv 2412.08480, the "max" step).

A per-image loss of the frozen model,
    authors     ℓ_i = ‖ε̂_θ(z_t, t, c_i) − z_0,i‖²       one t ~ U{0..T−1}, one ε per image: their code
                                                         compares ε̂ with the clean latent, not with ε
    eps-grid    ℓ_i = (1/M) Σ_m ‖ε̂_θ(z_{t_m}, t_m, c_i) − ε_m‖² / mean_j ‖…‖²,  t_m = (m + ½)·T/M
    eps-window  ℓ_i = (1/M) Σ_m ‖ε̂_θ(z_{t_m}, t_m, c_i) − ε_m‖²,  t_m ~ U[lo, hi)  (`--env-window`)
(‖·‖² the mean over latent elements), then soft memberships W ∈ Δ^K, one row per image,
    R_k = Σ_i w_ik ℓ_i / Σ_i w_ik,      max_W  std_k R_k + β · min_ik w_ik ℓ_i      (K = 8, β = 3)
by Adam (lr 0.01, 500 full-batch steps, W₀ ~ U(0, 1)), after each step clamping W at 0 and
renormalising its rows (the authors' projection). The β term rewards the smallest w_ik ℓ_i, so
its gradient reaches one entry a step: many entries still end at exactly 0.

Nothing here reads the bias attribute y; invdiff_report.py measures how the environments line up with it.
"""
import torch

ENV_LOSSES = ("authors", "eps-grid", "eps-window")


@torch.inference_mode()
def per_sample_losses(base, scheduler, z0, label, *, form="authors", draws=8, window=(0, 250),
                      generator=None, batch=1000, normalise=True) -> torch.Tensor:
    """ℓ_i [N] of the frozen model on latents z0 [N, c, h, w] with conditions label [N] (see above);
    normalise=False keeps eps-grid's raw ε-loss (the objective's ℓ_i at ε̃ = ε_θ, t on a grid)."""
    N, T, device = len(z0), scheduler.num_train_timesteps, z0.device

    def loss(t, noise, target):                      # t [N], noise / target [N, c, h, w] -> [N]
        out = []
        for s in range(0, N, batch):
            z_t = scheduler.add_noise(z0[s:s + batch], noise[s:s + batch], t[s:s + batch])
            with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
                pred = base(z_t, t[s:s + batch], label[s:s + batch]).float()
            eps_hat = scheduler.split_output(pred, t[s:s + batch], z_t)[1]     # ε̂ (also for v-prediction)
            out.append((eps_hat - target[s:s + batch]).square().mean((1, 2, 3)))
        return torch.cat(out)

    def noise():
        return torch.randn(z0.shape, generator=generator, device=device)       # [N, c, h, w]

    if form == "authors":
        return loss(torch.randint(0, T, (N,), generator=generator, device=device), noise(), z0)
    per_draw = []
    for m in range(draws):
        if form == "eps-grid":
            t = torch.full((N,), int((m + 0.5) * T / draws), device=device)
        else:
            t = torch.randint(window[0], min(window[1], T), (N,), generator=generator, device=device)
        eps = noise()
        l_m = loss(t, eps, eps)                                                # [N]
        per_draw.append(l_m / l_m.mean() if form == "eps-grid" and normalise else l_m)       # grid: each t weighs the same
    return torch.stack(per_draw).mean(0)                                       # [N]


def project_rows(W: torch.Tensor) -> torch.Tensor:
    """Onto the simplex the authors' way: clamp at 0, renormalise each row (an all-zero row -> uniform)."""
    W = W.clamp(min=0)
    s = W.sum(1, keepdim=True)
    return torch.where(s > 0, W / s.clamp_min(1e-30), 1 / W.shape[1])


def infer_environments(losses, K=8, iters=500, lr=0.01, beta=3.0, generator=None) -> torch.Tensor:
    """W [N, K], rows on the simplex, maximising std_k R_k + β·min_ik w_ik ℓ_i."""
    losses = losses.float().clone()                                            # a normal tensor (not inference mode)
    W = torch.rand((len(losses), K), generator=generator, device=losses.device).requires_grad_()
    opt = torch.optim.Adam([W], lr=lr)
    for _ in range(iters):
        weighted = W * losses[:, None]                                         # [N, K]
        R = weighted.sum(0) / W.sum(0).clamp_min(1e-12)                       # [K]
        opt.zero_grad(set_to_none=True)
        (-R.std() - beta * weighted.min()).backward()
        opt.step()
        with torch.no_grad():
            W.copy_(project_rows(W))
    return W.detach()
