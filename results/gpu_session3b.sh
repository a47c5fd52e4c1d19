#!/usr/bin/env bash
# Third session, last call of the lease: each call re-sends carry/, which removed the CelebA images
# unpacked by the first call, so the five CelebA reports (stage 4 of gpu_celeba.sh) had failed at
# their start. This unpacks them again, trains the evaluation classifiers once, and reruns the
# reports (every fine-tune is cached), with the cmnist DDM variants beside them on runs/e2e's base.
python3 -m zipfile -e carry/celeba.zip carry/data/
export FAIRDIFF_DATA=$PWD/carry/data PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30 TORCH_LOGS=-all
pkill -f "results/gpu_session3.sh"
L=runs/logs P="--preset small" FD=0,0.01,0.05,0.1,0.2,0.5 SPD=0,0.05,0.5
stamp() { echo "$(date +%s) $*" >> runs/timeline.txt; }
stamp "celeba reports again"
{ for a in 0 0.01 0.05 0.1 0.2 0.5; do echo "--finetune lora $a"; echo "--ce-max-t 100 $a"; done; } |
  setsid xargs -P 6 -L 1 sh -c 'python3 ddm.py --dataset cmnist --runs runs/e2e --scenarios fd --train-only true \
    $0 $1 --alphas $2 > "runs/logs/cmnist_variant_$1_$2.log" 2>&1' &
V=$!
python3 evaluate.py --n 200 --run "$(ls -d runs/celeba/base-* | head -1)" > $L/celeba_evaluator.log 2>&1
for b in 0.8 0.2; do
  python3 ddm.py --dataset celeba $P --bias $b --scenarios fd --alphas $FD --report runs/celeba/ddm-b$b-fd \
    > $L/ddm_celeba_b${b}_fd.log 2>&1 &
  python3 ddm.py --dataset celeba $P --bias $b --scenarios spd --alphas $SPD --report runs/celeba/ddm-b$b-spd \
    > $L/ddm_celeba_b${b}_spd.log 2>&1 &
done
python3 invdiff.py --dataset celeba $P --steps 1000 --batch-size 512 > $L/invdiff_celeba.log 2>&1 &
wait; stamp "celeba reports end"
while kill -0 $V 2>/dev/null; do sleep 1; done
python3 ddm.py --dataset cmnist --runs runs/e2e --scenarios fd --finetune lora \
  --report runs/e2e/cmnist/ddm-lora > $L/cmnist_lora.log 2>&1 &
python3 ddm.py --dataset cmnist --runs runs/e2e --scenarios fd --ce-max-t 100 \
  --report runs/e2e/cmnist/ddm-smallt > $L/cmnist_smallt.log 2>&1 &
wait; stamp "variants end"
