#!/usr/bin/env bash
# What the next GPU session runs, on one H100 lease, started by results/gpu_call.sh
# (carry ["carry", ".whl"]: the data and diffusers' wheel):
# 1. the CUDA-graph test (skipped on CI's CPU), then bench.py's training step, eager and captured in a
#    CUDA graph (--cuda-graph), ours and diffusers' UNet2DModel side by side, alone on the GPU (~3 min;
#    issue "Speed");
# 2. the CelebA runs owed by issues "DDM" and "InvDiff" (~29 min), with cmnist beside them: first
#    `python ddm.py --dataset cmnist` from nothing (with --cuda-graph true if its test passed), whose
#    wall time, measured while sharing the GPU, is an upper bound of its time alone; then the cmnist
#    DDM variants (LoRA; CE only at t < 100), which reuse its stages (full fine-tuning is their
#    baseline). Launch-bound cmnist fits in the gaps of compute-bound CelebA: results are unaffected.
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30 TORCH_LOGS=-all PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
L=runs/logs; mkdir -p $L
stamp() { echo "$(date +%s) $*" >> runs/timeline.txt; }

stamp "bench start"   # first the CUDA-graph test that CI cannot run (graph = eager; resume exact)
python3 -m pytest -q -p no:cacheprovider tests/test_core.py -k "cuda_graph or graph_step" > $L/pytest_cuda_graph.log 2>&1
python3 bench.py --compare diffusers --no-sampling --out runs/bench/eager.json > $L/bench_eager.log 2>&1
python3 bench.py --compare diffusers --no-sampling --cuda-graph --out runs/bench/graph.json > $L/bench_graph.log 2>&1
stamp "bench end"

cmnist() {  # the e2e first (its wall time is issue "Speed"'s figure), then the variants on its stages
  G=false; grep -q " passed" $L/pytest_cuda_graph.log && ! grep -q "failed" $L/pytest_cuda_graph.log && G=true
  stamp "cmnist e2e start (cuda graph $G)"
  python3 ddm.py --dataset cmnist --cuda-graph $G > $L/ddm_cmnist_e2e.log 2>&1 ||
    { stamp "cmnist e2e failed: again eagerly (stages cached)"
      python3 ddm.py --dataset cmnist > $L/ddm_cmnist_e2e_eager.log 2>&1; }
  stamp "cmnist e2e end"
  { for a in 0 0.01 0.05 0.1 0.2 0.5; do echo "--finetune lora $a"; echo "--ce-max-t 100 $a"; done; } |
    xargs -P 4 -L 1 sh -c 'python3 ddm.py --dataset cmnist --scenarios fd --train-only true \
      $0 $1 --alphas $2 > "runs/logs/cmnist_variant_$1_$2.log" 2>&1'
  # both reuse the e2e's autoencoder, base model, α = 0 arm... and evaluation classifiers
  python3 ddm.py --dataset cmnist --scenarios fd --finetune lora --report runs/cmnist/ddm-lora > $L/cmnist_lora.log 2>&1 &
  python3 ddm.py --dataset cmnist --scenarios fd --ce-max-t 100 --report runs/cmnist/ddm-smallt > $L/cmnist_smallt.log 2>&1 &
  wait; stamp "cmnist variants end"
}
cmnist &
bash results/gpu_celeba.sh
wait
