#!/usr/bin/env bash
# DDM in the authors' regime (protocol prior) on colored MNIST with a fine-tune that moves: the same
# sweep as cmnist_ddm_prior.sh (base at red:green 1:1; 115 arms: train ratios 1:4, 4:1, 1:1; α 0, 0.01,
# 0.05, 0.2, 0.5; the rebalanced α = 0 baseline; the adversarial ablation at α 0.05 and 0.5; seeds 0-4;
# LoRA r 8 scale 4, 1,000 updates at batch 4, CFG 1 and 7.5), FD scenario, with lr 1e-4 instead of the
# authors' 1e-5. Preset small, one GPU (1,166 s on one NVIDIA H200 while another job shared it).
# Run from the repository root.
# Committed: results/cmnist_ddm_prior_lr1e-4/ (report.md, metrics.json, tradeoff.png, grids/, fd_log.jsonl).
set -e
python ddm.py --dataset cmnist --lr 1e-4 --scenarios fd   # report in runs/cmnist/ddm-prior-<config hash>/
