#!/usr/bin/env bash
# Reproduces results/celeba_ddm_prior/ and results/celeba_ddm_prior_lr1e-4/: DDM in the authors' regime
# (protocol prior) on CelebA-64, group = gender: a base trained on a gender-balanced subset, then 115 arms
# (train ratios M:F 1:4, 4:1, 1:1; α 0, 0.01, 0.05, 0.2, 0.5; the rebalanced α = 0 baseline; the
# adversarial ablation at α 0.05 and 0.5; seeds 0-4), each 1,000 LoRA updates at batch 4, FD scenario,
# CFG 1 and 7.5, 500 samples per arm and CFG scale, preset small, one GPU; at the authors' lr 1e-5 and
# at lr 1e-4. On one NVIDIA H200, the two sharing it after the first trained the base: 1,042 s and 813 s.
# Run from the repository root with the CelebA folder under the data root (README, "Data").
# Reports land in runs/celeba/ddm-prior-<config hash>/ (report.md, metrics.json, tradeoff.png, grids/);
# the committed grids/ hold JPEG copies of 12 of each run's 46 grids.
set -e
python ddm.py --dataset celeba --scenarios fd --n-samples 500
python ddm.py --dataset celeba --scenarios fd --n-samples 500 --lr 1e-4
