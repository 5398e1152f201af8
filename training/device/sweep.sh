#!/bin/bash
# Training runs side by side on one GPU machine (README.md beside this file).
# usage: sweep.sh DATA_ROOT DEVICE RUNS_DIR LIMIT_S; results land in $OUT as each run ends.
D=$1; DEV=$2; R=$3; LIMIT=$4
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$R" "$OUT"
PY=${PY:-python3}
T0=$(date +%s)
# decode once, in parallel, into the cache every run reads (runs decoding at once would race)
$PY -c "
from training.data import load_cases
from training.images import decoded_images
decoded_images(list(load_cases('$D', True).frame.image), 224, 'var/cache', workers=16)
" || exit 1
echo "decoded in $(( $(date +%s) - T0 )) s"
collect() {
  ( flock 9
    tar czf "$OUT/results.tmp.tgz" -C "$R" --exclude='*.pt' --exclude=checkpoints . &&
      mv "$OUT/results.tmp.tgz" "$OUT/results.tgz"
    [ -f "$R/s0/model.pt" ] && cp "$R/s0/model.pt" "$OUT/s0-model.pt"
  ) 9>/tmp/collect.lock
}
start() {
  name=$1; shift
  ( timeout "$LIMIT" "$@" > "$R/$name.log" 2>&1
    echo "$name rc=$? $(( $(date +%s) - T0 ))s" >> "$R/rc.txt"; collect ) &
}
TR="env OMP_NUM_THREADS=2 $PY -m plugin.cli train --device $DEV --data-root $D"
LO="$PY -m training.leave_one_clinic_out --device $DEV --data-root $D --epochs 2"
# the runs: edit here (2026-12-01: three seeds of two recipes and every clinic's fold)
start s0 $TR --output-dir "$R/s0"
start s1 $TR --output-dir "$R/s1" --seed 1
start s2 $TR --output-dir "$R/s2" --seed 2
for c in isic2020 isic_archive rosendahl vidir_modern vidir_molemax vienna_dias; do
  start "loco-$c" $LO --clinics "$c" --out "$R/loco"
done
wait
cat "$R/rc.txt"
