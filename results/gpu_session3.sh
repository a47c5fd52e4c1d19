#!/usr/bin/env bash
# What the third session ran on one H100 lease (started detached by results/gpu_call.sh):
# the CUDA-graph probe alone on the GPU, the CelebA runs, then a plain `python ddm.py --dataset cmnist`
# from nothing (its wall time, alone on the GPU), then the cmnist DDM variants (LoRA; CE only at
# small t) on that run's base model.
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30 TORCH_LOGS=-all
L=runs/logs; mkdir -p $L
stamp() { echo "$(date +%s) $*" >> runs/timeline.txt; }

stamp "graph probe start"
timeout 240 env PYTHONPATH=. python3 bench/graph_probe.py > bench/graph_probe_h100.txt 2>&1
stamp "graph probe end"
bash results/gpu_celeba.sh

stamp "cmnist e2e start"
{ time python3 ddm.py --dataset cmnist --runs runs/e2e; } > $L/ddm_cmnist_e2e.log 2>&1
stamp "cmnist e2e end"
{ for a in 0 0.01 0.05 0.1 0.2 0.5; do echo "--finetune lora $a"; echo "--ce-max-t 100 $a"; done; } |
  xargs -P 8 -L 1 sh -c 'python3 ddm.py --dataset cmnist --runs runs/e2e --scenarios fd --train-only true \
    $0 $1 --alphas $2 > "runs/logs/cmnist_variant_$1_$2.log" 2>&1'
python3 ddm.py --dataset cmnist --runs runs/e2e --scenarios fd --finetune lora \
  --report runs/e2e/cmnist/ddm-lora > $L/cmnist_lora.log 2>&1 &
python3 ddm.py --dataset cmnist --runs runs/e2e --scenarios fd --ce-max-t 100 \
  --report runs/e2e/cmnist/ddm-smallt > $L/cmnist_smallt.log 2>&1 &
wait; stamp "all done"
