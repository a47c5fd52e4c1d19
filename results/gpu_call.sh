#!/usr/bin/env bash
# One device call: unpack the carried data, run SCRIPT (default results/gpu_session2.sh, with its
# arguments in ARGS) for at most BUDGET seconds, stop it cleanly (every stage resumes), and pack
# what it wrote (no checkpoints) into $OUT. E.g. SCRIPT=results/gpu_celeba.sh ARGS=ddm BUDGET=540.
cd "$(git rev-parse --show-toplevel)"
python3 -m zipfile -e carry/celeba.zip carry/data/ && export FAIRDIFF_DATA=$PWD/carry/data
if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site; fi
python3 -c "import einops, tqdm, diffusers; print('diffusers', diffusers.__version__)" 2>&1 | tail -1
bash ${SCRIPT:-results/gpu_session2.sh} $ARGS & P=$!
for i in $(seq ${BUDGET:-540}); do kill -0 $P 2>/dev/null || break; sleep 1; done
JOBS='python3 (ddm|ddpm|invdiff|evaluate|vae|bench)'
pkill -INT -f "$JOBS"                      # training runs finish their step and checkpoint (train.py)
for i in $(seq 40); do pgrep -f "$JOBS" > /dev/null || break; sleep 1; done
pkill -9 -f "$JOBS"; sleep 1
tar czf $OUT/results.tgz --exclude='*.pt' --exclude='runs/cache' runs bench/*.json bench/*.txt 2>/dev/null
cp runs/timeline.txt $OUT/ ; nvidia-smi --query-gpu=name,memory.used --format=csv >> $OUT/timeline.txt
tail -n 3 runs/logs/*.log | tail -n 80
