#!/usr/bin/env bash
# What produced results/cmnist/invdiff and results/celeba (one H100 call, see README "Results").
# Two pipelines share the GPU: InvDiff on cmnist, and DDM on CelebA-64 at train M:F 4:1 (bias 0.8)
# with a reduced sweep (α ∈ {0, 0.05, 0.1}, 2000 base steps) to fit the session's GPU time.
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30 TORCH_LOGS=-all
OUT=${OUT:-out}; mkdir -p "$OUT/logs"
t0=$(date +%s)
invdiff() {
  python3 ddpm.py --dataset cmnist > "$OUT/logs/base_cmnist.log" 2>&1
  python3 invdiff.py --dataset cmnist --steps 1500 --train-only true --arms base > "$OUT/logs/inv_envs.log" 2>&1
  for arm in invdiff lambda0 random oracle; do
    python3 invdiff.py --dataset cmnist --steps 1500 --arms $arm --train-only true > "$OUT/logs/inv_$arm.log" 2>&1 &
  done
  wait
  python3 invdiff.py --dataset cmnist --steps 1500 > "$OUT/logs/invdiff_cmnist.log" 2>&1
  echo "invdiff done after $(( $(date +%s) - t0 )) s"
}
celeba() {
  C="--dataset celeba --bias 0.8"
  python3 ddm.py $C --alphas 0 --scenarios fd --train-only true > "$OUT/logs/celeba_base.log" 2>&1
  for sc in fd spd; do for a in 0 0.05 0.1; do
    python3 ddm.py $C --scenarios $sc --alphas $a --train-only true > "$OUT/logs/celeba_${sc}_$a.log" 2>&1 &
  done; done
  wait
  python3 ddm.py $C --alphas 0,0.05,0.1 > "$OUT/logs/ddm_celeba.log" 2>&1
  echo "celeba done after $(( $(date +%s) - t0 )) s"
}
invdiff &
celeba &
wait
