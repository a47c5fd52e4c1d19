#!/usr/bin/env bash
# Reproduces results/cmnist/base/, results/cmnist/ddm/, results/mnist-pair/base/ and
# results/mnist-pair/ddm/: DDM on colored MNIST (red:green 4:1) and on the digit pair 7 vs 8 (4:1),
# preset small, seed 0, one GPU. Run from the repository root.
# Reports land in runs/<dataset>/ddm/ (report.md, metrics.json, tradeoff.png, sample grids); the base
# model's own evaluation in runs/<dataset>/base-<hash>/eval/.
# Every stage is cached by its config, so a rerun continues where a stopped one ended. Step 2 runs the
# fine-tunes as parallel processes: a training step is launch-bound, so they share one GPU well.
set -e
ALPHAS="0 0.01 0.05 0.1 0.2 0.5"

# 1. autoencoder, base model and evaluation classifiers
for ds in cmnist mnist-pair; do
  python ddpm.py --dataset $ds
  python evaluate.py --run "$(ls -d runs/$ds/base-* | head -1)" --n 2000
done

# 2. every DDM arm (FD and SPD, six α each), 12 processes at a time
for ds in cmnist mnist-pair; do for sc in fd spd; do for a in $ALPHAS; do echo "$ds $sc $a"; done; done; done |
  xargs -P 12 -L 1 sh -c 'python ddm.py --dataset $0 --scenarios $1 --alphas $2 --train-only true'

# 3. sampling, evaluation and the reports (every arm is trained by now)
for ds in cmnist mnist-pair; do
  python ddm.py --dataset $ds
done
