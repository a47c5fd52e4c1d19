#!/usr/bin/env bash
# What the next GPU session runs, on one H100 lease, started by results/gpu_call.sh
# (carry ["carry", ".whl"]: the data and diffusers' wheel):
# 1. the CUDA-graph test (skipped on CI's CPU), then bench.py's training step, eager and captured in a
#    CUDA graph (--cuda-graph), ours and diffusers' UNet2DModel side by side, alone on the GPU (~3 min;
#    issue "Speed");
# 2. the CelebA runs owed by issues "DDM" and "InvDiff" (~29 min), with the cmnist DDM variants
#    (LoRA; CE only at t < 100; full fine-tuning as their baseline) beside them: launch-bound
#    runs that fit in the gaps of the compute-bound CelebA ones (results are unaffected, timings are);
# 3. if the lease lasts: `python ddm.py --dataset cmnist --cuda-graph true` from nothing.
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30 TORCH_LOGS=-all PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
L=runs/logs; mkdir -p $L
stamp() { echo "$(date +%s) $*" >> runs/timeline.txt; }

stamp "bench start"   # first the CUDA-graph test that CI cannot run (graph = eager; resume exact)
python3 -m pytest -q -p no:cacheprovider tests/test_core.py -k "cuda_graph or graph_step" > $L/pytest_cuda_graph.log 2>&1
python3 bench.py --compare diffusers --no-sampling --out runs/bench/eager.json > $L/bench_eager.log 2>&1
python3 bench.py --compare diffusers --no-sampling --cuda-graph --out runs/bench/graph.json > $L/bench_graph.log 2>&1
stamp "bench end"

cmnist_variants() {
  stamp "cmnist variants start"
  python3 ddm.py --dataset cmnist --scenarios fd --alphas 0 --train-only true > $L/cmnist_base.log 2>&1
  { for a in 0 0.01 0.05 0.1 0.2 0.5; do echo "--finetune lora $a"; echo "--ce-max-t 100 $a"; done; } |
    xargs -P 4 -L 1 sh -c 'python3 ddm.py --dataset cmnist --scenarios fd --train-only true \
      $0 $1 --alphas $2 > "runs/logs/cmnist_variant_$1_$2.log" 2>&1'
  # the full fine-tunes' report first: it trains the evaluation classifiers the other two reuse
  python3 ddm.py --dataset cmnist --scenarios fd --report runs/cmnist/ddm-full > $L/cmnist_full.log 2>&1
  python3 ddm.py --dataset cmnist --scenarios fd --finetune lora --report runs/cmnist/ddm-lora > $L/cmnist_lora.log 2>&1 &
  python3 ddm.py --dataset cmnist --scenarios fd --ce-max-t 100 --report runs/cmnist/ddm-smallt > $L/cmnist_smallt.log 2>&1 &
  wait; stamp "cmnist variants end"
}
cmnist_variants &
bash results/gpu_celeba.sh
wait

stamp "cmnist e2e (cuda graph) start"
python3 ddm.py --dataset cmnist --runs runs/e2e --cuda-graph true > $L/ddm_cmnist_e2e_graph.log 2>&1
stamp "cmnist e2e (cuda graph) end"
