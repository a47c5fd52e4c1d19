#!/usr/bin/env bash
# InvDiff in the authors' configuration on colored MNIST, color spuriously tied to the digit: digit d in
# its majority color (d mod 2: even red, odd green) with probability ρ, test split balanced. Defaults of
# invdiff.py: environments from ℓ = ‖ε̂ − z₀‖² at K = 8 with β = 3, G_ψ a zeroed copy of the frozen base
# trained at r = 0.5 and sampled at r = 0.5 and 0.8, arms erm / inferred λ ∈ {0, 1, 10, 100} / random /
# oracle cells λ ∈ {0, 1} at seeds 0-2 as one stacked model, CFG 2 and 7.5; preset small, one GPU.
# Run from the repository root.
# Committed (one NVIDIA H200 each): results/cmnist_invdiff_authors/ from the first command (ρ = 0.9),
# results/cmnist_invdiff_rho0.95/ from the second, results/cmnist_invdiff_eps-grid/ from the third,
# results/cmnist_invdiff_rho0.95_eps-grid/ from the fourth: report.md
# with the verdict, metrics.json, environments.{md,json}, grids_r<r>_s<scale>.png, loss.png, log.jsonl.
# The second and third ran with --cuda-graph false (the eager step: the same computation, slower).
# `--stage environments` writes the environment table alone, in a few minutes.
set -e
python invdiff.py --dataset cmnist                     # report in runs/cmnist/invdiff-<config>-<base>/
python invdiff.py --dataset cmnist --spurious 0.95 --cuda-graph false
python invdiff.py --dataset cmnist --env-loss eps-grid --cuda-graph false  # environments from the ε-loss
python invdiff.py --dataset cmnist --spurious 0.95 --env-loss eps-grid
