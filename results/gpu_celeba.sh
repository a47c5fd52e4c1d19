#!/usr/bin/env bash
# The CelebA-64 runs still owed by issues "DDM" and "InvDiff", split so each fits one machine lease
# (a machine goes back after 30 minutes held, and runs/ goes with it):
#
#   bash results/gpu_celeba.sh ddm       # DDM at train M:F 4:1 and 1:4   (~19 min on one H100)
#   bash results/gpu_celeba.sh invdiff   # InvDiff, condition Smiling, bias Male (~15 min)
#
# Estimates from this repo's own H100 logs: CelebA autoencoder 2,000 steps 197 s; a base model
# 2,000 steps at batch 1024 ~310 s alone (2.8 steps/s each with three side by side); fine-tunes
# 500 steps at batch 256. Resumable: run it again on the same warm machine after a call is cut
# (results/gpu_call.sh stops it with SIGINT, on which training checkpoints).
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30 TORCH_LOGS=-all
L=runs/logs; mkdir -p $L
stamp() { echo "$(date +%s) $*" >> runs/timeline.txt; }
P="--preset ${PRESET:-small}"              # PRESET=tiny: a CPU dry run of this very script
INV="--dataset celeba $P"
[ "${PRESET:-small}" = small ] && INV="$INV --steps 1000 --batch-size 512"

ddm() {
  stamp "celeba ddm start"
  python3 vae.py --dataset celeba $P > $L/celeba_vae.log 2>&1 || return
  for b in 0.8 0.2; do   # base model + the α=0 FD arm
    python3 ddm.py --dataset celeba $P --bias $b --scenarios fd --alphas 0 --train-only true > $L/celeba_base_$b.log 2>&1 &
  done
  wait; stamp "celeba bases end"
  python3 evaluate.py --n 200 --run "$(ls -d runs/celeba/base-* | head -1)" > $L/celeba_evaluator.log 2>&1 &
  { for b in 0.8 0.2; do for a in 0.01 0.05 0.1 0.5; do echo "$b fd $a"; done; for a in 0 0.05 0.5; do echo "$b spd $a"; done; done; } |
    P="$P" xargs -P 7 -L 1 sh -c 'python3 ddm.py --dataset celeba $P --bias $0 --scenarios $1 --alphas $2 --train-only true \
      > "runs/logs/celeba_b$0_$1_$2.log" 2>&1'
  wait; stamp "celeba ddm arms end"
  for b in 0.8 0.2; do
    python3 ddm.py --dataset celeba $P --bias $b --scenarios fd --alphas 0,0.01,0.05,0.1,0.5 \
      --report runs/celeba/ddm-b$b-fd > $L/ddm_celeba_b${b}_fd.log 2>&1 &
    python3 ddm.py --dataset celeba $P --bias $b --scenarios spd --alphas 0,0.05,0.5 \
      --report runs/celeba/ddm-b$b-spd > $L/ddm_celeba_b${b}_spd.log 2>&1 &
  done
  wait; stamp "celeba ddm reports end"
}

invdiff() {
  stamp "celeba invdiff start"
  python3 invdiff.py $INV --arms base --train-only true > $L/inv_celeba_base.log 2>&1 || return
  for arm in invdiff lambda0 random oracle; do
    python3 invdiff.py $INV --arms $arm --train-only true > $L/inv_celeba_$arm.log 2>&1 &
  done
  wait; stamp "celeba invdiff arms end"
  python3 invdiff.py $INV > $L/invdiff_celeba.log 2>&1
  stamp "celeba invdiff end"
}

case "$1" in
  ddm|invdiff) "$1" ;;
  *) echo "usage: bash results/gpu_celeba.sh ddm|invdiff" >&2; exit 2 ;;
esac
