#!/usr/bin/env bash
# What the next GPU session runs, on one H100 lease, started by results/gpu_call.sh (carry ["carry"]):
# the CelebA runs owed by issues "DDM" and "InvDiff" (~29 min), then the cmnist DDM variants (LoRA;
# CE only at t < 100) with their own base model (~7 min), then, if the lease lasts, a plain
# `python ddm.py --dataset cmnist` from nothing, alone on the GPU (its wall time, issue "Speed").
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30 TORCH_LOGS=-all PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
L=runs/logs; mkdir -p $L
stamp() { echo "$(date +%s) $*" >> runs/timeline.txt; }

bash results/gpu_celeba.sh

stamp "cmnist variants start"
python3 ddm.py --dataset cmnist --scenarios fd --alphas 0 --train-only true > $L/cmnist_base.log 2>&1
{ for a in 0 0.01 0.05 0.1 0.2 0.5; do echo "--finetune lora $a"; echo "--ce-max-t 100 $a"; done; } |
  xargs -P 6 -L 1 sh -c 'python3 ddm.py --dataset cmnist --scenarios fd --train-only true \
    $0 $1 --alphas $2 > "runs/logs/cmnist_variant_$1_$2.log" 2>&1'
python3 ddm.py --dataset cmnist --scenarios fd --finetune lora --report runs/cmnist/ddm-lora > $L/cmnist_lora.log 2>&1 &
python3 ddm.py --dataset cmnist --scenarios fd --ce-max-t 100 --report runs/cmnist/ddm-smallt > $L/cmnist_smallt.log 2>&1 &
python3 ddm.py --dataset cmnist --scenarios fd --report runs/cmnist/ddm-full > $L/cmnist_full.log 2>&1 &
wait; stamp "cmnist variants end"

stamp "cmnist e2e start"
python3 ddm.py --dataset cmnist --runs runs/e2e > $L/ddm_cmnist_e2e.log 2>&1
stamp "cmnist e2e end"
