#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, with target-gpu/ragar (deploy/gpu/build-cuda.sh)
# carried over: times SD1.5's operations in candle (`ragar bench ops`) and in PyTorch
# (deploy/gpu/ops_anchor.py) on the same card, batch 1 and 4, writes the JSON into $OUT
# (ops_candle_bB.json, ops_anchor_bB.json) and prints candle's time over PyTorch's per operation.
#
#   bash deploy/gpu/bench-ops.sh [REPS]
set -euo pipefail
cd "$(dirname "$0")/../.."
reps="${1:-20}"
. deploy/gpu/cuda-libs.sh
out="${OUT:-target-gpu}"
mkdir -p "$out"
for b in 1 4; do
  ./target-gpu/ragar bench ops --batch "$b" --reps "$reps" > "$out/ops_candle_b$b.json"
  PYTHONUNBUFFERED=1 python3 deploy/gpu/ops_anchor.py "$b" "$reps" > "$out/ops_anchor_b$b.json"
done
python3 - "$out" <<'PY'
import json, os, sys
out = sys.argv[1]
for b in (1, 4):
    candle = json.load(open(os.path.join(out, f"ops_candle_b{b}.json")))
    torch = {r["name"]: r["ms"] for r in json.load(open(os.path.join(out, f"ops_anchor_b{b}.json")))["ops"]}
    print(f"batch {b}: {'operation':<44}{'candle ms':>11}{'torch ms':>10}{'ratio':>8}  rate")
    for r in candle["ops"]:
        t = torch.get(r["name"])
        rate = f"{r['tflops']:.1f} TFLOP/s" if "tflops" in r else f"{r['gbps']:.0f} GB/s"
        ratio = f"{r['ms'] / t:8.2f}" if t else f"{'-':>8}"
        print(f"         {r['name']:<44}{r['ms']:11.3f}{(t if t else float('nan')):10.3f}{ratio}  {rate}")
PY
