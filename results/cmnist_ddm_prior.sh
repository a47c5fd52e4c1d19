#!/usr/bin/env bash
# Reproduces results/cmnist_ddm_prior/: DDM in the authors' regime (protocol prior, the default) on
# colored MNIST: a base trained at red:green 1:1, then 115 arms per scenario (train ratios 1:4, 4:1,
# 1:1; α 0, 0.01, 0.05, 0.2, 0.5; the rebalanced α = 0 baseline; the adversarial ablation at α 0.05
# and 0.5; seeds 0-4), each 1,000 LoRA updates at batch 4, FD and SPD, CFG 1 and 7.5, preset small,
# one GPU (771 s on one H200). Run from the repository root.
# The report lands in runs/cmnist/ddm-prior-<config hash>/ (report.md, metrics.json, tradeoff.png, grids/).
set -e
python ddm.py --dataset cmnist
