#!/usr/bin/env bash
# Reproduces the setting of results/celeba/ddm-m4f1-fd/, ddm-m1f4-fd/, ddm-m4f1-spd/ and ddm-m1f4-spd/:
# DDM, protocol biased-base, on CelebA-64 with training M:F 4:1 (--bias 0.8) and 1:4 (--bias 0.2),
# 7,000 training faces each, FD scenario (six α) and SPD scenario (three α), preset small, seed 0,
# one GPU. Run from the repository root with the CelebA folder under the data root (README, "Data").
# Every scenario's arms train as one stacked model (the committed reports trained them one process each).
# Reports land in runs/celeba/ddm-b<bias>-<scenario>/ (report.md, metrics.json, tradeoff.png, grids).
set -e
C="--dataset celeba --preset small --protocol biased-base"
for b in 0.8 0.2; do
  python ddm.py $C --bias $b --scenarios fd --alphas 0,0.01,0.05,0.1,0.2,0.5 --report runs/celeba/ddm-b$b-fd
  python ddm.py $C --bias $b --scenarios spd --alphas 0,0.05,0.5 --report runs/celeba/ddm-b$b-spd
done
