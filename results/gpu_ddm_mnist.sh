#!/usr/bin/env bash
# What produced results/cmnist and results/mnist-pair (one H100 call, see README "Results").
# Stage 1 trains the autoencoders, base models and evaluation classifiers; stage 2 fine-tunes every
# DDM arm in parallel processes (a step is launch-bound, so processes share the GPU well);
# stage 3 reruns ddm.py, which finds every arm trained and only samples, evaluates and reports.
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30 TORCH_LOGS=-all
OUT=${OUT:-out}; mkdir -p "$OUT/logs"
ALPHAS="0 0.01 0.05 0.1 0.2 0.5"
t0=$(date +%s)
for ds in cmnist mnist-pair; do
  ( python3 ddpm.py --dataset $ds && python3 evaluate.py --run "$(ls -d runs/$ds/base-*)" --n 2000 ) \
    > "$OUT/logs/base_$ds.log" 2>&1 &
done
wait
echo "stage 1 done after $(( $(date +%s) - t0 )) s"
for ds in cmnist mnist-pair; do for sc in fd spd; do for a in $ALPHAS; do echo "$ds $sc $a"; done; done; done |
  xargs -P 12 -L 1 sh -c 'python3 ddm.py --dataset $0 --scenarios $1 --alphas $2 --train-only true \
    > "'"$OUT"'/logs/arm_$0_$1_$2.log" 2>&1'
echo "stage 2 done after $(( $(date +%s) - t0 )) s"
for ds in cmnist mnist-pair; do
  ( time python3 ddm.py --dataset $ds ) > "$OUT/logs/ddm_$ds.log" 2>&1 &
done
wait
echo "stage 3 done after $(( $(date +%s) - t0 )) s"
