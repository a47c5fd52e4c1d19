#!/usr/bin/env bash
# Reproduces the setting of results/cmnist/base/, results/cmnist/ddm/, results/mnist-pair/base/ and
# results/mnist-pair/ddm/: DDM, protocol biased-base, on colored MNIST (red:green 4:1) and on the digit
# pair 7 vs 8 (4:1), preset small, seed 0, one GPU. Run from the repository root.
# Every scenario's arms train as one stacked model (the committed reports trained them one process each).
# Reports land in runs/<dataset>/ddm-biased-base-<config hash>/; the base model's own evaluation in
# runs/<dataset>/base-<hash>/eval/. Every stage is cached by its config, so a rerun continues.
set -e
for ds in cmnist mnist-pair; do
  python ddpm.py --dataset $ds
  python evaluate.py --run "$(ls -d runs/$ds/base-* | head -1)" --n 2000
  python ddm.py --dataset $ds --protocol biased-base
done
