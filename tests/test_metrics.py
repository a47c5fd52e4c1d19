"""Tests for metrics.py against hand-computed values: the fairness metrics (FD, group shares, SPD,
Bias), the bootstrap CIs, the Fréchet distance, the across-seed interval, the DDM verdict rule and the
confusion correction."""
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's flat modules without installing
import metrics  # noqa: E402
from metrics import (bias_score, bootstrap, fd_half_l1, fd_l2, frechet_distance, frechet_from_moments,  # noqa: E402
                     group_shares, moments, share_weights, spd)


# ------------------------------------------------------------------------------- fairness metrics
def labels_with_shares(*counts):
    return torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])


def test_fd_two_groups_is_0_30_for_shares_0_8_0_2():
    p = group_shares(labels_with_shares(800, 200), 2)
    assert p.tolist() == pytest.approx([0.8, 0.2])
    assert fd_half_l1(p).item() == pytest.approx(0.30)
    assert fd_l2(p).item() == pytest.approx(0.30 * math.sqrt(2))
    assert fd_half_l1(group_shares(labels_with_shares(500, 500), 2)).item() == pytest.approx(0.0)


def test_fd_three_groups_by_hand():
    p = group_shares(labels_with_shares(500, 300, 200), 3)
    # ½(|.5-1/3| + |.3-1/3| + |.2-1/3|) = ½(5/30 + 1/30 + 4/30) = 1/6
    assert fd_half_l1(p).item() == pytest.approx(1 / 6)
    # sqrt((5/30)² + (1/30)² + (4/30)²) = sqrt(42)/30
    assert fd_l2(p).item() == pytest.approx(math.sqrt(42) / 30)
    # all in one group: total variation 1 - 1/K
    assert fd_half_l1(torch.tensor([1.0, 0.0, 0.0])).item() == pytest.approx(2 / 3)


def test_group_shares_leave_out_no_group():
    groups = torch.cat([labels_with_shares(80, 20), torch.full((50,), -1)])
    assert group_shares(groups, 2).tolist() == pytest.approx([0.8, 0.2])


def test_spd_on_hand_made_success_tables():
    a = torch.tensor([1, 1, 1, 0], dtype=torch.bool)        # P(success | a) = 0.75
    b = torch.tensor([1, 0, 0, 0], dtype=torch.bool)        # P(success | b) = 0.25
    assert spd([a, b]) == pytest.approx(0.5)
    assert spd([b, a]) == pytest.approx(0.5)
    rates = [torch.arange(10) < r for r in (9, 5, 7)]        # 0.9, 0.5, 0.7: max - min
    assert spd(rates) == pytest.approx(0.4)
    assert spd([a, a]) == 0


def test_bias_score_by_hand():
    # (|6-2| + |6-2| + |2-2|) / 10 / 3
    assert bias_score(torch.tensor([6, 2, 2])) == pytest.approx(8 / 30)
    # K = 2: |n0 - n1| / N = 2 · FD_half_l1
    assert bias_score(torch.tensor([8, 2])) == pytest.approx(0.6)
    assert bias_score(torch.tensor([5, 5, 5])) == 0


def test_bootstrap_ci_covers_true_share():
    """200 datasets of 400 labels with P(group 0) = 0.3: the 95% CI covers 0.3 in ≥ 90% of them
    (measured: 0.97)."""
    gen = torch.Generator().manual_seed(0)
    covered = 0
    for trial in range(200):
        groups = (torch.rand(400, generator=gen) >= 0.3).long()
        lo, hi = bootstrap(groups, 2, seed=trial)["p_hat"][0].tolist()
        covered += lo <= 0.3 <= hi
    assert covered / 200 >= 0.90


def test_bootstrap_ci_brackets_estimate_and_fd():
    groups = labels_with_shares(700, 300)
    ci = bootstrap(groups, 2)
    assert ci["p_hat"][0, 0] < 0.7 < ci["p_hat"][0, 1]
    assert ci["FD_half_l1"][0] < 0.2 < ci["FD_half_l1"][1]
    assert ci["FD_l2"][0] < 0.2 * math.sqrt(2) < ci["FD_l2"][1]


# ----------------------------------------------------------------------------------- Fréchet distance
def test_fid_of_a_set_with_itself_is_zero():
    f = torch.randn(500, 16, generator=torch.Generator().manual_seed(0))
    assert abs(frechet_distance(f, f)) < 1e-6


def test_fid_of_diagonal_gaussians_matches_closed_form():
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    a, b = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 1.0])
    exact = ((mu1 - mu2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum()          # 5 + 1 + 1 + 4 = 11
    d = lambda v: torch.diag(v).double()
    assert frechet_from_moments(mu1.double(), d(a), mu2.double(), d(b)) == pytest.approx(exact.item())
    gen = torch.Generator().manual_seed(0)
    f1 = mu1 + a.sqrt() * torch.randn(200_000, 3, generator=gen)
    f2 = mu2 + b.sqrt() * torch.randn(200_000, 3, generator=gen)
    assert frechet_distance(f1, f2) == pytest.approx(exact.item(), abs=0.1)


def test_fid_trace_term_for_non_commuting_covariances():
    """tr (S1^½ S2 S1^½)^½ = Σ √λ(S1 S2): checked against the eigenvalues of the plain product."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 5, 5, generator=gen, dtype=torch.float64)
    s1, s2 = x @ x.T + 0.1 * torch.eye(5), y @ y.T + 0.1 * torch.eye(5)
    trace_root = torch.linalg.eigvals(s1 @ s2).real.clamp_min(0).sqrt().sum()
    expected = (s1.trace() + s2.trace() - 2 * trace_root).item()
    zero = torch.zeros(5, dtype=torch.float64)
    assert frechet_from_moments(zero, s1, zero, s2) == pytest.approx(expected, rel=1e-8)


def test_share_weights_move_the_reference_to_the_requested_share():
    groups = labels_with_shares(50, 50)
    f = torch.cat([torch.zeros(50, 2), torch.ones(50, 2)])             # group 0 at 0, group 1 at 1
    mu, _ = moments(f, share_weights(groups, torch.tensor([0.8, 0.2])))
    assert mu.tolist() == pytest.approx([0.2, 0.2])


# ------------------------------------------------------------------------------------- across seeds
def test_seed_interval_matches_its_formula():
    x = torch.tensor([0.30, 0.34, 0.29, 0.35, 0.32], dtype=torch.float64)
    s = metrics.seed_summary(x.tolist())
    se = x.std(correction=1) / 5 ** 0.5
    assert s["mean"] == pytest.approx(x.mean().item()) and s["se"] == pytest.approx(se.item())
    assert s["hi"] - s["mean"] == pytest.approx(2.776 * se.item())        # t_{0.975, 4}
    assert metrics.seed_summary([0.3])["lo"] == 0.3


def verdict_arms(fd_alpha, fd_plain, fd_rebalanced, fid_alpha=1.0):
    row = lambda a, fd, fid: {"alpha": a, "FD": fd, "FD_corrected": fd, "FID_C": fid}
    return {"plain": row(0.0, fd_plain, [1.0] * len(fd_plain)), "rebalanced": row(0.0, fd_rebalanced, [1.0] * len(fd_plain)),
            "α=0.1": row(0.1, fd_alpha, [fid_alpha] * len(fd_plain))}


def test_verdict_rule_says_does_not_for_arms_of_one_distribution_and_lowers_for_a_clear_case():
    g = torch.Generator().manual_seed(0)
    same = lambda: (0.3 + 0.02 * torch.randn(5, generator=g)).tolist()
    draws = [metrics.ddm_verdict(verdict_arms(same(), same(), same()), "plain", "rebalanced")["lowers"] for _ in range(20)]
    assert sum(draws) <= 1                                                 # 2-SE against two baselines: rare
    clear = verdict_arms([0.05, 0.06, 0.04, 0.05, 0.07], [0.30, 0.31, 0.29, 0.32, 0.30], [0.2, 0.21, 0.19, 0.2, 0.22])
    assert metrics.ddm_verdict(clear, "plain", "rebalanced")["lowers"]
    assert not metrics.ddm_verdict({**clear, "α=0.1": {**clear["α=0.1"], "FID_C": [2.0] * 5}}, "plain", "rebalanced")["lowers"]
    beats_plain_only = verdict_arms([0.2] * 4 + [0.21], [0.30, 0.31, 0.29, 0.32, 0.30], [0.1, 0.11, 0.09, 0.1, 0.12])
    assert not metrics.ddm_verdict(beats_plain_only, "plain", "rebalanced")["lowers"]
    one_sample = verdict_arms([0.25, 0.25], [0.267, 0.267], [0.267, 0.267])     # each seed moved 1 of 60 samples
    assert metrics.ddm_verdict(one_sample, "plain", "rebalanced")["lowers"]      # SE_d = 0 without the floor
    assert not metrics.ddm_verdict(one_sample, "plain", "rebalanced", n_samples=60)["lowers"]


def test_confusion_correction_undoes_a_known_reader():
    """A reader that calls 10% of group 0 'group 1' and 20% of group 1 'group 0': p = (Mᵀ)⁻¹ q."""
    M = torch.tensor([[0.9, 0.1], [0.2, 0.8]], dtype=torch.float64)
    p = torch.tensor([0.7, 0.3], dtype=torch.float64)
    assert torch.allclose(metrics.corrected_shares(M.T @ p, M), p)
    true, read = torch.tensor([0, 0, 0, 1, 1]), torch.tensor([0, 1, 0, 1, -1])
    assert torch.allclose(metrics.confusion_matrix(true, read, 2), torch.tensor([[2 / 3, 1 / 3], [0.0, 1.0]], dtype=torch.float64))
