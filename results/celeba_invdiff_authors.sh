#!/usr/bin/env bash
# InvDiff in the authors' configuration on CelebA-64: condition Smiling, bias Male (given to no stage),
# training cells smiling men : smiling women : other men : other women = 1:2:2:1 (the authors' cells,
# invdiff.py's CelebA default) and 1:4:4:1; held-out splits balanced. Defaults of invdiff.py:
# environments from ℓ = ‖ε̂ − z₀‖² at K = 8 with β = 3, G_ψ a zeroed copy of the frozen base trained at
# r = 0.5 and sampled at r = 0.5 and 0.8, arms erm / inferred λ ∈ {0, 1, 10, 100} / random / oracle
# cells λ ∈ {0, 1} at seeds 0-2 as one stacked model, CFG 2 and 7.5; preset small, one GPU.
# Run from the repository root with the CelebA folder under the data root (README, "Data").
# Committed (the two runs ran at the same time on one NVIDIA H200; this script runs them in turn):
# results/celeba_invdiff_authors/ from the first command, results/celeba_invdiff_cells1-4-4-1/ from the
# second: report.md with the verdict, metrics.json, environments.{md,json}, grids_r<r>_s<scale>.png
# (cropped of blank margins after the run), loss.png, log.jsonl.
set -e
python invdiff.py --dataset celeba                       # report in runs/celeba/invdiff-<config>-<base>/
python invdiff.py --dataset celeba --cell-ratio 1,4,4,1
