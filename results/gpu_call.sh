#!/usr/bin/env bash
# One device call. The first call on a machine unpacks the carried data and starts SCRIPT (with ARGS)
# in its own process session (setsid), so that it outlives the call; every call then watches it for
# at most BUDGET seconds and packs what it has written so far (no checkpoints) into $OUT. Repeat the
# same call while the machine is warm until runs/timeline.txt says the script ended.
#   SCRIPT=results/gpu_session3.sh BUDGET=570 bash results/gpu_call.sh
cd "$(git rev-parse --show-toplevel)"
mkdir -p runs/logs
if [ ! -f runs/driver.pid ]; then
  python3 -m zipfile -e carry/celeba.zip carry/data/
  if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site; fi
  python3 -c "import einops, tqdm; print('einops and tqdm present')"
  FAIRDIFF_DATA=$PWD/carry/data setsid bash $SCRIPT $ARGS > runs/logs/driver.log 2>&1 < /dev/null &
  echo $! > runs/driver.pid
fi
for i in $(seq ${BUDGET:-570}); do kill -0 "$(cat runs/driver.pid)" 2>/dev/null || break; sleep 1; done
tar czf $OUT/results.tgz --exclude='*.pt' --exclude='runs/cache' runs bench/*.json bench/*.txt 2>/dev/null
cp runs/timeline.txt $OUT/; nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv >> $OUT/timeline.txt
tail -n 2 runs/logs/*.log | tail -n 90
