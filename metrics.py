"""The metrics and statistics, pure functions of tensors: how fair and how good one set of samples is,
what several seeds say together, and the verdict rule of the DDM report.

Fairness. p̂_k = n_k / Σ_j n_j is the share of samples in group k; samples in no group (-1) are
left out of the counts (evaluate.py reports their share as `no_group`). u = (1/K, …, 1/K):

    FD_half_l1 = ½ Σ_k |p̂_k − 1/K|     (= |p̂_0 − 0.5| for K = 2; the total variation to uniform)
    FD_l2      = ‖p̂ − u‖₂               (Choi et al. 2020)

95% CIs by the percentile bootstrap: resample the N group labels with replacement B = 1000 times
(seeded), recompute p̂ and FD, take the 2.5% and 97.5% quantiles.

SPD, for a model conditioned on the group a, from one bool per sample (success: see evaluate.py):

    SPD = max_a P(success | cond = a) − min_a P(success | cond = a)     (= |P_a − P_b| for K = 2)

Bias (InvDiff), for class-conditional samples. Condition p gives n_i samples in group i, N_p = Σ n_i:

    Bias_p = Σ_{i<j} |n_i − n_j| / N_p / (K(K−1)/2)

The Fréchet distance between Gaussians fitted to features f₁ [N₁, D] and f₂ [N₂, D] (evaluate.py's
FID-C), in float64, with mean μ and unbiased covariance S (rows of f₂ may be weighted; with w
normalised to sum 1: μ = Σ_i w_i f_i, S = Σ_i w_i (f_i − μ)(f_i − μ)ᵀ / (1 − Σ_i w_i²)):

    d_F(f₁, f₂) = ‖μ₁ − μ₂‖² + tr(S₁ + S₂ − 2 (S₁^½ S₂ S₁^½)^½)

FID-C's real side is one fixed set of features f₂ with groups g, weighted per arm by the arm's own
share p (share_weights: w_i = p_g / n_g for i in group g). So it is reduced once to per-group counts
n_g, means μ_g and covariances C_g = (1/n_g) Σ_{i∈g} (f_i − μ_g)(f_i − μ_g)ᵀ (`group_moments`), and
each arm's weighted moments follow in O(K D²) instead of O(N D²) (`mixture_moments`): with
π_g = p_g / Σ_{h: n_h > 0} p_h for a group with members and 0 for an empty one (the normalised
weights put π_g / n_g on each member of g),

    μ = Σ_g π_g μ_g,   S = Σ_g π_g (C_g + (μ_g − μ)(μ_g − μ)ᵀ) / (1 − Σ_g π_g² / n_g),

exactly the weighted mean and unbiased covariance above (Σ_i w_i² = Σ_g π_g² / n_g); π_g = n_g / N
gives the unweighted ones. The decompositions of the D × D matrices (D ≈ 130) run on one CPU thread:
a matrix that small gains nothing from more (1.7 ms on 1 or on 16 cores of an idle host), and with
the cores oversubscribed, two evaluations on one 16-core host, one eigendecomposition on 16 threads
took a second instead of a millisecond.

Seeds. An arm trained at S seeds gives values x_1 … x_S (its FD, p̂, FID-C, …):

    x̄ = (1/S) Σ_s x_s,   SE = sd / √S (sd with ddof 1),   95% interval  x̄ ± t_{0.975, S−1} · SE

The arms of one sweep share their seeds (fine-tune seed and sampling noise), so two arms A and B are
compared through the paired differences d_s = x_s(A) − x_s(B): d̄ and SE_d = sd(d) / √S.

Confusion correction. The group reader errs. With M[i, j] = P(read as j | true group i), measured on
real held-out images (or on their VAE reconstructions, closer to what a generator draws), the shares
read from samples are q = Mᵀ p, so the corrected shares are p = (Mᵀ)⁻¹ q, projected back onto the
simplex (clamped at 0, renormalised).

The verdict rule (`ddm_verdict`, printed in the report above its table). For one train ratio and CFG
scale, "DDM lowers FD" only if some α > 0 arm has, across seeds,

    d̄ < −2 · max(SE_d, 0.5 / √(n·S))   against the plain α = 0 fine-tune AND against the
    group-rebalanced α = 0 fine-tune (where the sweep has one), on the FD of the read p̂ and on the FD of the
    confusion-corrected p̂, and mean FID-C ≤ 1.2 × the plain α = 0 arm's mean FID-C;

otherwise "DDM does not lower FD". The floor 0.5 / √(n·S) is the largest binomial standard error of
a share read from n samples, averaged over S seeds: with few seeds the paired differences can agree
by chance (SE_d = 0 for two seeds that both moved one sample), and a difference within sampling
resolution must not count. The same rule reads SPD in place of FD for the SPD scenario (without a
corrected form: its success rates are read per sample), with the floor √2 larger, since SPD is a
difference of two rates of n samples each.
"""
import math
from contextlib import contextmanager

import torch

# t_{0.975, df} for df = 1 … 30 (two-sided 95%); beyond 30 the normal 1.96 (4% low at df = 31, less after)
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042]
FID_SLACK = 1.2          # an arm may cost at most 20% FID-C over the plain α = 0 arm
SE_MARGIN = 2.0          # "lower" means by more than two standard errors of the paired difference
N_BOOT = 1000            # bootstrap resamples


# ------------------------------------------------------------------------------ one set of samples
def group_shares(groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """groups int64 [N] (-1 = no group, left out) -> p̂ float64 [K]."""
    counts = torch.bincount(groups[groups >= 0], minlength=num_groups).double()
    return counts / counts.sum().clamp_min(1)


def fd_half_l1(p: torch.Tensor) -> torch.Tensor:
    """½ Σ_k |p̂_k − 1/K| over the last dim (= |p̂_0 − 0.5| for two groups)."""
    return 0.5 * (p - 1 / p.shape[-1]).abs().sum(-1)


def fd_l2(p: torch.Tensor) -> torch.Tensor:
    """‖p̂ − u‖₂ over the last dim."""
    return (p - 1 / p.shape[-1]).norm(dim=-1)


def bootstrap(groups, num_groups, n_boot=N_BOOT, seed=0) -> dict:
    """Percentile-bootstrap 95% CIs: {'p_hat': [K, 2], 'FD_half_l1': [2], 'FD_l2': [2]}."""
    groups = groups[groups >= 0]
    n, gen = len(groups), torch.Generator().manual_seed(seed)
    resampled = groups[torch.randint(max(n, 1), (n_boot, n), generator=gen)]             # [B, N]
    counts = torch.zeros(n_boot, num_groups, dtype=torch.float64)
    counts.scatter_add_(1, resampled, torch.ones_like(resampled, dtype=torch.float64))    # [B, K]
    p = counts / max(n, 1)                                                                # [B, K]
    q = torch.tensor([0.025, 0.975], dtype=torch.float64)
    return {"p_hat": p.quantile(q, dim=0).T, "FD_half_l1": fd_half_l1(p).quantile(q), "FD_l2": fd_l2(p).quantile(q)}


def spd(success) -> float:
    """success: one bool tensor per requested group a -> max_a P(success | a) − min_a P(success | a)."""
    rates = torch.stack([s.double().mean() for s in success])
    return (rates.max() - rates.min()).item()


def bias_score(counts: torch.Tensor) -> float:
    """InvDiff's Bias_p = Σ_{i<j} |n_i − n_j| / N_p / (K(K−1)/2) for the group counts n [K]."""
    n, k = counts.double(), len(counts)
    pairs = (n[:, None] - n[None, :]).abs().triu(1).sum()
    return (pairs / n.sum().clamp_min(1) / (k * (k - 1) / 2)).item()


def moments(f: torch.Tensor, weights=None):
    """Weighted mean [D] and unbiased weighted covariance [D, D] of features f [N, D], in float64."""
    f = f.double()
    w = torch.ones(len(f), dtype=torch.float64) if weights is None else weights.double()
    w = w / w.sum()                                                                    # [N]
    mu = w @ f
    x = f - mu
    return mu, (x.T * w) @ x / (1 - w.square().sum())


def share_weights(groups: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Weights that give group g the share p_g: p_g / n_g for each of its n_g members."""
    counts = torch.bincount(groups, minlength=len(p)).double()
    return p.double()[groups] / counts[groups]


def frechet_distance(f1: torch.Tensor, f2: torch.Tensor, weights2=None) -> float:
    """FID between Gaussians fitted to features f1 [N1, D] and f2 [N2, D] (rows of f2 weighted)."""
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1] or min(len(f1), len(f2)) < 2:
        raise ValueError(f"features must be [N ≥ 2, D] with one D, got {tuple(f1.shape)} and {tuple(f2.shape)}")
    return frechet_from_moments(*moments(f1), *moments(f2, weights2))


def frechet_from_moments(mu1, s1, mu2, s2) -> float:
    """‖μ₁ − μ₂‖² + tr S₁ + tr S₂ − 2 tr (S₁^½ S₂ S₁^½)^½. The middle matrix is symmetric PSD, so the
    trace of its square root is Σ √λ of its eigenvalues: two symmetric eigendecompositions, no sqrtm,
    on one thread (see the module docstring)."""
    with one_thread():
        lam, vec = torch.linalg.eigh(s1)
        root1 = vec @ torch.diag(lam.clamp_min(0).sqrt()) @ vec.T                      # S₁^½
        middle = root1 @ s2 @ root1
        trace_root = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
        return ((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * trace_root).item()


@contextmanager
def one_thread():
    """torch's CPU work inside the block on one thread; the caller's thread count comes back after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def group_moments(f: torch.Tensor, groups: torch.Tensor, num_groups: int) -> tuple:
    """Features f [N, D] of groups int64 [N] (each in 0 … K−1) -> (n [K], μ [K, D], C [K, D, D]),
    float64: each group's count, mean and covariance C_g = (1/n_g) Σ_{i∈g} (f_i − μ_g)(f_i − μ_g)ᵀ
    (zeros for an empty group)."""
    if f.ndim != 2 or groups.shape != (len(f),) or ((groups < 0) | (groups >= num_groups)).any():
        raise ValueError(f"group_moments needs features [N, D] and N groups in 0 … {num_groups - 1}, "
                         f"got {tuple(f.shape)} and {tuple(groups.shape)}")
    f, groups = f.double(), groups.to(f.device)
    n = torch.bincount(groups, minlength=num_groups).double()                           # [K]
    mu = torch.zeros(num_groups, f.shape[1], dtype=torch.float64, device=f.device).index_add_(0, groups, f)
    mu = mu / n.clamp_min(1)[:, None]                                                   # [K, D]
    x = f - mu[groups]                                                                  # [N, D]
    C = torch.stack([x[groups == g].T @ x[groups == g] for g in range(num_groups)])     # [K, D, D]
    return n, mu, C / n.clamp_min(1)[:, None, None]


def mixture_moments(reference: tuple, p=None) -> tuple:
    """moments(f, share_weights(groups, p)) from reference = group_moments(f, groups, K), in O(K D²)
    (the module docstring's equations); p None: moments(f), unweighted. -> (μ [D], S [D, D])."""
    n, mu, C = reference
    pi = n / n.sum() if p is None else torch.where(n > 0, torch.as_tensor(p, dtype=torch.float64), 0.0)
    pi = pi / pi.sum()                                                                  # [K]
    mean = pi @ mu                                                                      # [D]
    d = mu - mean                                                                       # [K, D]
    scatter = torch.einsum("g,gij->ij", pi, C) + (d.T * pi) @ d                         # [D, D]
    return mean, scatter / (1 - (pi.square() / n.clamp_min(1)).sum())


def frechet_to_reference(f: torch.Tensor, reference: tuple, p=None) -> float:
    """frechet_distance(f, f₂, share_weights(g₂, p)) (p None: unweighted) for reference =
    group_moments(f₂, g₂, K), reduced once for any number of arms; all of it on one thread."""
    if f.ndim != 2 or f.shape[1] != reference[1].shape[1] or len(f) < 2:
        raise ValueError(f"features must be [N ≥ 2, D] with the reference's D = {reference[1].shape[1]}, "
                         f"got {tuple(f.shape)}")
    with one_thread():
        return frechet_from_moments(*moments(f), *mixture_moments(reference, p))


# -------------------------------------------------------------------------------------- across seeds

def t975(df: int) -> float:
    return T975[df - 1] if df <= len(T975) else 1.96


def seed_summary(values) -> dict:
    """{'mean', 'se', 'lo', 'hi', 'n'} of per-seed values: the 95% t-interval across seeds (one seed:
    the interval is the point, se NaN)."""
    x = torch.as_tensor(values, dtype=torch.float64)
    n, mean = len(x), x.mean().item()
    if n < 2:
        return {"mean": mean, "se": float("nan"), "lo": mean, "hi": mean, "n": n}
    se = (x.std(correction=1) / math.sqrt(n)).item()
    return {"mean": mean, "se": se, "lo": mean - t975(n - 1) * se, "hi": mean + t975(n - 1) * se, "n": n}


def paired(a, b) -> dict:
    """Paired difference of two arms over the same seeds: {'diff': d̄, 'se': SE_d}."""
    if len(a) != len(b):
        raise ValueError(f"paired: {len(a)} values against {len(b)}; pair arms over the same seeds")
    d = torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)
    se = (d.std(correction=1) / math.sqrt(len(d))).item() if len(d) > 1 else float("nan")
    return {"diff": d.mean().item(), "se": se}


def confusion_matrix(true: torch.Tensor, read: torch.Tensor, num_groups: int) -> torch.Tensor:
    """M[i, j] = P(read as j | true i), float64 [K, K]; reads of no group (-1) are left out."""
    keep = read >= 0
    counts = torch.zeros(num_groups, num_groups, dtype=torch.float64)
    counts.index_put_((true[keep], read[keep]), torch.ones(int(keep.sum()), dtype=torch.float64), accumulate=True)
    return counts / counts.sum(1, keepdim=True).clamp_min(1)


def corrected_shares(q: torch.Tensor, confusion: torch.Tensor) -> torch.Tensor:
    """p = (Mᵀ)⁻¹ q projected onto the simplex; q the read shares [K]. A singular M leaves q as it is."""
    q = torch.as_tensor(q, dtype=torch.float64)
    try:
        p = torch.linalg.solve(confusion.T, q)
    except RuntimeError:                                          # singular: the reader tells nothing
        return q
    p = p.clamp_min(0)
    return p / p.sum() if p.sum() > 0 else q


def ddm_verdict(arms: dict, plain: str, rebalanced, metric="FD", corrected=True, n_samples=None) -> dict:
    """Apply the rule of the module docstring. arms: name -> {'alpha': α, metric: [per seed],
    metric + '_corrected': [per seed] (if corrected), 'FID_C': [per seed]}; plain / rebalanced: the
    names of the two baselines (rebalanced None: only the plain one, e.g. at a 1:1 ratio); n_samples:
    the samples behind each value (None: no floor on the standard error).
    -> {'lowers': bool, 'passing': [names], 'checks': name -> {...}}."""
    baselines = [plain] + ([rebalanced] if rebalanced else [])
    keys = [metric] + ([metric + "_corrected"] if corrected else [])
    fid_limit = FID_SLACK * seed_summary(arms[plain]["FID_C"])["mean"]
    checks = {}
    for name, arm in arms.items():
        if name in baselines or arm["alpha"] <= 0:
            continue
        lower = {f"{key} vs {b}": paired(arm[key], arms[b][key]) for key in keys for b in baselines}
        spread = 2 if metric == "SPD" else 1          # SPD is itself a difference of two rates
        floor = 0.5 * math.sqrt(spread / (n_samples * len(arm[metric]))) if n_samples else 0.0
        below = all(c["diff"] < -SE_MARGIN * max(c["se"], floor) for c in lower.values())   # NaN se (one seed): False
        fid = seed_summary(arm["FID_C"])["mean"]
        checks[name] = {"lower": lower, "below_both": below, "FID_C": fid, "FID_C_limit": fid_limit,
                        "passes": below and fid <= fid_limit}
    passing = [name for name, c in checks.items() if c["passes"]]
    return {"lowers": bool(passing), "passing": passing, "checks": checks}


def verdict_rule(metric="FD") -> str:
    """The rule as one sentence, for the report (written before its table)."""
    return (f"Rule, fixed before the runs: DDM lowers {metric} only if some α > 0 has a {metric} below the "
            f"plain α = 0 fine-tune and (where the sweep has one: not at a 1:1 ratio, not in protocol biased-base) "
            f"the group-rebalanced α = 0 fine-tune by more than {SE_MARGIN:g} standard errors of "
            f"the paired across-seed difference (floored at 0.5/√(n·S), the binomial error of a share of n samples "
            f"at S seeds)" + (", on the read and on the confusion-corrected p̂," if metric == "FD"
                                                    else ",") +
            f" at a mean FID-C ≤ {FID_SLACK:g}× the α = 0 arm's; otherwise it does not.")
