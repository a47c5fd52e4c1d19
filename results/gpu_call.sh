#!/usr/bin/env bash
# One device call. The first call on a machine unpacks the carried data outside the checkout and
# starts SCRIPT (with ARGS) in its own process session (setsid), so that it outlives the call; every
# call then watches it for at most BUDGET seconds and packs what it has written so far into $OUT.
# Repeat the same call while the machine is warm until runs/timeline.txt says the script ended:
#   SCRIPT=results/gpu_session4.sh BUDGET=570 bash results/gpu_call.sh   (carry: ["carry", ".whl"])
# Two lessons of the third session shape this: each call re-sends the working tree, which replaces
# carry/ and deletes files written into the checkout outside ignored folders, so the data lives in
# /tmp and every output under runs/; and at most 8 files of 16 MiB come back, so the tables travel in
# one small archive and the images in 15 MiB parts.
cd "$(git rev-parse --show-toplevel)"
export FAIRDIFF_DATA=/tmp/fairdiff-data
mkdir -p runs/logs
if [ ! -f runs/driver.pid ]; then
  mkdir -p $FAIRDIFF_DATA && cp -r carry/data/MNIST $FAIRDIFF_DATA/
  python3 -c "import tarfile as t, sys; t.open(sys.argv[1]).extractall(sys.argv[2],
    **({'filter': 'data'} if hasattr(t, 'data_filter') else {}))" carry/celeba.tar.xz $FAIRDIFF_DATA
  # (CelebA at 64 px: the 16,572 faces and the two label files, 26 MB; the filter where Python has it)
  if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site; fi
  python3 -c "import einops, tqdm; print('einops and tqdm present')"
  setsid bash $SCRIPT $ARGS > runs/logs/driver.log 2>&1 < /dev/null &
  echo $! > runs/driver.pid
fi
for i in $(seq ${BUDGET:-570}); do kill -0 "$(cat runs/driver.pid)" 2>/dev/null || break; sleep 1; done
cp runs/timeline.txt $OUT/; nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv >> $OUT/timeline.txt
find runs -type f \( -name '*.md' -o -name '*.json' -o -name '*.jsonl' -o -name '*.log' -o -name '*.txt' \) |
  tar czf $OUT/tables.tgz -T -
find runs -type f -name '*.png' | tar czf - -T - | split -b 15M - $OUT/images.tgz.part-
ls -la $OUT; tail -n 1 runs/timeline.txt
