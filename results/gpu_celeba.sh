#!/usr/bin/env bash
# The CelebA-64 runs owed by issues "DDM" and "InvDiff", in one flow that fits one machine lease
# (a machine goes back after 30 minutes held, and runs/ goes with it):
#
#   bash results/gpu_celeba.sh          # ~29 min on one H100; PRESET=tiny: a CPU dry run of it
#   SPD= FORMS= EXTRA="--cuda-graph true" bash results/gpu_celeba.sh   # DDM's FD scenario only, captured
#
# Stage times are those measured on an H100 in the third session (runs/timeline.txt there):
# 1. the autoencoder (2,000 steps): 110 s;
# 2. three base models side by side: DDM at train M:F 4:1 and 1:4 (each with its α = 0 FD arm) and
#    InvDiff's Smiling × Male 1:4:4:1 (2,000 steps at batch 1024, 3.55 steps/s each): 618 s;
# 3. every fine-tune as its own process, 8 at a time: DDM FD α ∈ {0.01, 0.05, 0.1, 0.2, 0.5} and
#    SPD α ∈ {0, 0.05, 0.5} per ratio (500 steps, batch 256), InvDiff's four arms (1,000 steps, batch
#    512), with the evaluation classifiers training beside them: 462 s. Since then InvDiff's four arms
#    also run in the additive form ε̃ = ε_θ + r·G_ψ (the convex form's faces came out degraded:
#    results/celeba/invdiff/samples_training_*.png), about two minutes more;
# 4. the reports (sampling + evaluation), all six side by side: under 394 s (they shared the GPU
#    with cmnist runs there, and one of them ran out of GPU memory: hence expandable segments, and
#    any report without its metrics.json is run again alone).
# Every stage is cached by its config hash, so a second run continues where a cut one stopped.
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30 TORCH_LOGS=-all PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
export L=runs/logs P="--preset ${PRESET:-small} ${EXTRA:-}"
mkdir -p $L
stamp() { echo "$(date +%s) $*" >> runs/timeline.txt; }
export INV="--dataset celeba $P"
[ "${PRESET:-small}" = small ] && INV="$INV --steps 1000 --batch-size 512"
FD=0,0.01,0.05,0.1,0.2,0.5 SPD=${SPD-0,0.05,0.5} FORMS=${FORMS-convex additive}  # empty: skipped

arm() {  # one fine-tune: "ddm <bias> <scenario> <alpha>" or "invdiff <form> <arm>"
  case $1 in
    ddm) python3 ddm.py --dataset celeba $P --bias $2 --scenarios $3 --alphas $4 --train-only true \
           > $L/celeba_b$2_$3_$4.log 2>&1 ;;
    invdiff) python3 invdiff.py $INV --guidance-form $2 --arms $3 --train-only true > $L/inv_celeba_$2_$3.log 2>&1 ;;
  esac
}
export -f arm

stamp "celeba start"
python3 vae.py --dataset celeba $P > $L/celeba_vae.log 2>&1 || exit
stamp "celeba vae end"
for b in 0.8 0.2; do arm ddm $b fd 0 & done
[ -n "$FORMS" ] && arm invdiff convex base &
wait; stamp "celeba bases end"

python3 evaluate.py --n 200 --run "$(ls -d runs/celeba/base-* | head -1)" > $L/celeba_evaluator.log 2>&1 &
{ for b in 0.8 0.2; do
    for a in ${FD//,/ }; do [ $a = 0 ] || echo "ddm $b fd $a"; done
    for a in ${SPD//,/ }; do echo "ddm $b spd $a"; done
  done
  for f in $FORMS; do for a in invdiff lambda0 random oracle; do echo "invdiff $f $a"; done; done
} | xargs -P 8 -L 1 bash -c 'arm "$@"' _
wait; stamp "celeba arms end"

reports() {  # one line per report: "<folder> <script and flags>"; $1 = how many at once
  for b in 0.8 0.2; do
    echo "runs/celeba/ddm-b$b-fd ddm.py --dataset celeba $P --bias $b --scenarios fd --alphas $FD"
    [ -n "$SPD" ] && echo "runs/celeba/ddm-b$b-spd ddm.py --dataset celeba $P --bias $b --scenarios spd --alphas $SPD"
  done
  for f in $FORMS; do echo "runs/celeba/invdiff-$f invdiff.py $INV --guidance-form $f"; done
}
report() {  # skipped when its metrics.json exists
  [ -f $1/metrics.json ] || python3 "${@:2}" --report $1 > $L/report_$(basename $1).log 2>&1
}
export -f report
reports | xargs -P 6 -L 1 bash -c 'report "$@"' _
reports | xargs -P 1 -L 1 bash -c 'report "$@"' _     # again, one at a time, any that failed (GPU memory)
stamp "celeba reports end"
