#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, with target-gpu/ragar (deploy/gpu/build-cuda.sh)
# and data/emojistyle (32 px) carried over: trains the diffusion generator on the GPU and leaves the
# bundle in $OUT (or models/generator-gpu). Arguments go to `ragar train generator`.
set -euo pipefail
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu; do
  [ -d "$d" ] && LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
export LD_LIBRARY_PATH
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
out="${OUT:-models}/generator-gpu"
time ./target-gpu/ragar train generator --out "$out" --quiet "$@"
cat "$out/curves.csv"
