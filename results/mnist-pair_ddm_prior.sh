#!/usr/bin/env bash
# Reproduces results/mnist-pair_ddm_prior/: DDM in the authors' regime (protocol prior, the default) on
# the digit pair 7 vs 8 (group = digit): a base trained at 7:8 = 1:1, then 115 arms per scenario (train
# ratios 1:4, 4:1, 1:1; α 0, 0.01, 0.05, 0.2, 0.5; the rebalanced α = 0 baseline; the adversarial
# ablation at α 0.05 and 0.5; seeds 0-4), each 1,000 LoRA updates at batch 4, FD and SPD, CFG 1 and 7.5,
# preset small, one GPU (1,633 s on one NVIDIA H200 shared with two other runs). Run from the
# repository root. The report lands in runs/mnist-pair/ddm-prior-<config hash>/ (report.md,
# metrics.json, tradeoff.png, grids/).
set -e
python ddm.py --dataset mnist-pair
