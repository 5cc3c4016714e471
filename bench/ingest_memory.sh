#!/bin/bash
# Peak memory of a 2-worker stage-1 `seld train` on replicated stores, both ingest engines (issue 27).
#
#   bash bench/ingest_memory.sh SMOKE_STORE OUT_DIR [ROWS...]     (default rows: 10240 40960 122880)
#
# Replicates SMOKE_STORE (a `seld features` store of the smoke preset) to each size with
# bench/paper_store.py, then runs bench/cost.py around `seld train` with each engine, one run at a
# time; OUT_DIR/pss-ROWS-ENGINE.json holds each run's figures (peak PSS of the process tree, the
# growth of /dev/shm, their sum, data wait). Needs ~11 GiB of disk for the three stores.
set -euo pipefail
src=$1; out=$2; shift 2
rows=("${@:-10240 40960 122880}")
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-python}
mkdir -p "$out"
for n in ${rows[@]}; do
  [ -d "$out/s$n" ] || "$py" "$here/paper_store.py" "$src" --rows "$n" --out "$out/s$n"
  store=$(ls -d "$out/s$n"/features-*)
  for engine in rowgroups ray_data; do
    run="$out/run-$n-$engine"; rm -rf "$run"
    timeout 1800 "$py" "$here/cost.py" --interval 0.5 --run "$run" --json "$out/pss-$n-$engine.json" -- \
      seld train "$store" --preset smoke --out "$run" --workers 2 --set train.stages=stage1 \
      --set data.stage1_synth_per_real=1.0 --set train.torch_threads=1 --set data.engine=$engine
  done
done
