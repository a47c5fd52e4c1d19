#!/usr/bin/env bash
# What the third session ran on one H100 lease (started detached by the gpu_call.sh of then): the
# CUDA-graph probe, the CelebA runs, a plain `python ddm.py --dataset cmnist` from nothing, the cmnist
# DDM variants. Kept as the record. What went wrong, fixed in gpu_call.sh and gpu_session4.sh:
# the data was unpacked into carry/ and the probe wrote to bench/, and the second call's re-sent working
# tree removed both, so the CelebA reports failed at their start (rerun by gpu_session3b.sh) and the
# probe's output was lost (rerun alone at the end); the last call's archive was over the 16 MiB a file
# may have to come back, so only the logs' last lines returned. See README "CelebA-64".
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
