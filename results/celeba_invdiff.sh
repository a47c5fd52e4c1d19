#!/usr/bin/env bash
# The earlier configuration (a marginal bias, a ¼-width module, K = 2, the ε-loss, r = 0.8 in training
# and sampling): run it with the code of commit 7df36e3 (git checkout 7df36e3); today's invdiff.py
# defaults to the authors' configuration (results/celeba_invdiff_authors.sh).
# Reproduces results/celeba/invdiff/ (convex guidance) and results/celeba/invdiff-additive/: InvDiff on
# CelebA-64 with condition Smiling and bias Male (never given to any stage), training cells
# smiling men : smiling women : other men : other women = 1:4:4:1 (the CelebA default of that commit),
# 1,000 steps at batch 512 per arm, preset small, seed 0, one GPU. Run from the repository root with
# the CelebA folder under the data root (README, "Data").
# Reports land in runs/celeba/invdiff/ and runs/celeba/invdiff-additive/.
set -e
I="--dataset celeba --preset small --steps 1000 --batch-size 512"

python vae.py --dataset celeba --preset small              # the autoencoder (shared with DDM)
python invdiff.py $I --arms base --train-only true         # base model and inferred environments

# the four guidance modules in both forms, 8 processes at a time
for f in convex additive; do for a in invdiff lambda0 random oracle; do echo "$f $a"; done; done |
  xargs -P 8 -L 1 sh -c "python invdiff.py $I --guidance-form \$0 --arms \$1 --train-only true"

python invdiff.py $I --guidance-form convex --report runs/celeba/invdiff
python invdiff.py $I --guidance-form additive --report runs/celeba/invdiff-additive
