#!/usr/bin/env bash
# Builds the GPU artifact on a machine without a GPU: `ragar` with candle's CUDA backend and without
# LanceDB (the trainers and the generator need neither LanceDB nor the worker), small enough to
# carry to a GPU machine. CUDA 13.0's nvcc and libraries come from PyPI wheels
# (shared/tools/cuda-toolchain.sh); the binary needs the GPU machine's CUDA libraries at run time.
#
#   bash deploy/gpu/build-cuda.sh          # → target-gpu/ragar
set -euo pipefail
cd "$(dirname "$0")/../.."
toolchain="${CUDA_TOOLCHAIN_SCRIPT:-../shared/tools/cuda-toolchain.sh}"
eval "$(bash "$toolchain")"
# Its own target directory: the CUDA feature set must not invalidate the CPU build's.
export CARGO_TARGET_DIR="${CUDA_TARGET_DIR:-$HOME/.cache/ragar-target-cuda}"
cargo build --release --no-default-features --features cuda --bin ragar
mkdir -p target-gpu
cp "$CARGO_TARGET_DIR/release/ragar" target-gpu/ragar
strip target-gpu/ragar
ls -l target-gpu/ragar
