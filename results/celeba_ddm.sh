#!/usr/bin/env bash
# Reproduces results/celeba/ddm-m4f1-fd/, ddm-m1f4-fd/, ddm-m4f1-spd/ and ddm-m1f4-spd/: DDM on
# CelebA-64 with training M:F 4:1 (--bias 0.8) and 1:4 (--bias 0.2), 7,000 training faces each, FD
# scenario (six α) and SPD scenario (three α), preset small, seed 0, one GPU. Run from the repository
# root with the CelebA folder under the data root (README, "Data").
# Reports land in runs/celeba/ddm-b<bias>-<scenario>/ (report.md, metrics.json, tradeoff.png, grids).
set -e
C="--dataset celeba --preset small"
FD=0,0.01,0.05,0.1,0.2,0.5
SPD=0,0.05,0.5

python vae.py $C                                           # the autoencoder (balanced faces)
for b in 0.8 0.2; do                                       # the two base models, each with its α = 0 FD arm
  python ddm.py $C --bias $b --scenarios fd --alphas 0 --train-only true &
done
wait

# the other fine-tunes, 8 processes at a time
for b in 0.8 0.2; do
  for a in ${FD//,/ }; do [ $a = 0 ] || echo "$b fd $a"; done
  for a in ${SPD//,/ }; do echo "$b spd $a"; done
done | xargs -P 8 -L 1 sh -c "python ddm.py $C --bias \$0 --scenarios \$1 --alphas \$2 --train-only true"

# sampling, evaluation and the four reports
for b in 0.8 0.2; do
  python ddm.py $C --bias $b --scenarios fd --alphas $FD --report runs/celeba/ddm-b$b-fd
  python ddm.py $C --bias $b --scenarios spd --alphas $SPD --report runs/celeba/ddm-b$b-spd
done
