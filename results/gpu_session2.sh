#!/usr/bin/env bash
# What produced results/celeba (DDM at train M:F 1:4 and 4:1, InvDiff with condition Smiling), the
# cmnist DDM variants (LoRA, CE only at small t), the wall time of a plain `python ddm.py --dataset
# cmnist`, and bench/*.json + bench/profile_step_h100.txt (second session, one H100).
# Resumable: every stage is cached by its config hash, so when a call is cut off at its time limit,
# running this again on the same warm machine continues where it stopped. runs/timeline.txt keeps a
# line per stage start and end (unix seconds) across calls.
# This session: call 1 ran the eager bench (the compiled one was cut); calls 2 and 3 (with
# runs/bench.done touched) ran cmnist and CelebA side by side and were both cut by the call limit
# before any CelebA base model finished; see README "CelebA-64" and "Performance".
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30 TORCH_LOGS=-all
L=runs/logs; mkdir -p $L
stamp() { echo "$(date +%s) $*" >> runs/timeline.txt; }

bench() {   # alone on the GPU: the timings must not share it
  [ -f runs/bench.done ] && return
  stamp "bench start"
  python3 bench.py --compare diffusers > $L/bench_eager.log 2>&1
  python3 bench.py --compare diffusers --compile --channels-last > $L/bench_compile.log 2>&1
  { PYTHONPATH=. python3 bench/profile_step.py; PYTHONPATH=. python3 bench/profile_step.py --compile; } \
    > bench/profile_step_h100.txt 2>&1
  touch runs/bench.done; stamp "bench end"
}

cmnist() {  # launch-bound: shares the GPU with the compute-bound CelebA jobs
  if [ ! -f runs/cmnist_e2e.done ]; then
    stamp "cmnist e2e start"
    { time python3 ddm.py --dataset cmnist; } >> $L/ddm_cmnist_e2e.log 2>&1 && touch runs/cmnist_e2e.done
    stamp "cmnist e2e end"
  fi
  { for a in 0 0.05 0.1 0.5; do echo "--finetune lora --alphas $a"; echo "--ce-max-t 100 --alphas $a"; done; } |
    xargs -P 8 -L 1 sh -c 'python3 ddm.py --dataset cmnist --scenarios fd --train-only true $0 $1 $2 $3 \
      > "runs/logs/cmnist_variant_$1_$3.log" 2>&1'
  python3 ddm.py --dataset cmnist --scenarios fd --alphas 0,0.05,0.1,0.5 --finetune lora \
    --report runs/cmnist/ddm-lora > $L/cmnist_lora.log 2>&1
  python3 ddm.py --dataset cmnist --scenarios fd --alphas 0,0.05,0.1,0.5 --ce-max-t 100 \
    --report runs/cmnist/ddm-smallt > $L/cmnist_smallt.log 2>&1
  stamp "cmnist variants end"
}

celeba() {
  stamp "celeba start"
  python3 vae.py --dataset celeba > $L/celeba_vae.log 2>&1
  for b in 0.8 0.2; do   # base model + the α=0 FD arm
    python3 ddm.py --dataset celeba --bias $b --scenarios fd --alphas 0 --train-only true > $L/celeba_base_$b.log 2>&1 &
  done
  python3 invdiff.py --dataset celeba --steps 1000 --batch-size 512 --arms base --train-only true > $L/inv_celeba_base.log 2>&1 &
  wait; stamp "celeba bases end"
  python3 evaluate.py --run "$(ls -d runs/celeba/base-* | head -1)" --n 1000 > $L/celeba_evaluator.log 2>&1 &
  { for b in 0.8 0.2; do for a in 0.01 0.05 0.1 0.5; do echo "$b fd $a"; done; for a in 0 0.05 0.5; do echo "$b spd $a"; done; done; } |
    xargs -P 6 -L 1 sh -c 'python3 ddm.py --dataset celeba --bias $0 --scenarios $1 --alphas $2 --train-only true \
      > "runs/logs/celeba_b$0_$1_$2.log" 2>&1'
  wait; stamp "celeba ddm arms end"
  for arm in invdiff lambda0 random oracle; do
    python3 invdiff.py --dataset celeba --steps 1000 --batch-size 512 --arms $arm --train-only true > $L/inv_celeba_$arm.log 2>&1 &
  done
  for b in 0.8 0.2; do
    python3 ddm.py --dataset celeba --bias $b --scenarios fd --alphas 0,0.01,0.05,0.1,0.5 \
      --report runs/celeba/ddm-b$b-fd > $L/ddm_celeba_b${b}_fd.log 2>&1 &
    python3 ddm.py --dataset celeba --bias $b --scenarios spd --alphas 0,0.05,0.5 \
      --report runs/celeba/ddm-b$b-spd > $L/ddm_celeba_b${b}_spd.log 2>&1 &
  done
  wait; stamp "celeba ddm reports end"
  python3 invdiff.py --dataset celeba --steps 1000 --batch-size 512 > $L/invdiff_celeba.log 2>&1
  stamp "celeba invdiff end"
}

bench
cmnist &
celeba &
wait
stamp "all done"
