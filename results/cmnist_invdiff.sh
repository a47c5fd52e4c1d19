#!/usr/bin/env bash
# The earlier configuration (a marginal bias, a ¼-width module, K = 2, the ε-loss, r = 0.8 in training
# and sampling): run it with the code of commit 7df36e3 (git checkout 7df36e3); today's invdiff.py
# defaults to the authors' configuration (results/cmnist_invdiff_authors.sh).
# Reproduces results/cmnist/invdiff/: InvDiff on colored MNIST (condition = digit, bias = color,
# red:green 4:1), the five arms base, invdiff, lambda0, random and oracle, 1,500 steps per arm,
# preset small, seed 0, one GPU. Run from the repository root.
# The report lands in runs/cmnist/invdiff/ (report.md, metrics.json, environments.md, sample grids).
set -e
I="--dataset cmnist --steps 1500"

python ddpm.py --dataset cmnist                            # autoencoder and base model (shared with DDM)
python invdiff.py $I --arms base --train-only true         # the environments, inferred without labels
for arm in invdiff lambda0 random oracle; do               # the four guidance modules, side by side
  python invdiff.py $I --arms $arm --train-only true &
done
wait
python invdiff.py $I                                       # sampling, evaluation, report
