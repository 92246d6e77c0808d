#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, with target-gpu/ragar (deploy/gpu/build-cuda.sh)
# carried over: times the SD1.5 architecture (random weights,
# fp16) in candle (`ragar bench sd`) and in PyTorch/diffusers (the anchor,
# shared/tools/sd_unet_anchor.py) on the same card, writes the JSON lines into $OUT
# (candle_sd_VARIANT.json, sd_anchor.json, sd_ratios.json) and prints, per candle variant, its time
# over eager PyTorch's and over torch.compile's.
#
#   bash deploy/gpu/bench-sd.sh [ANCHOR] [ARGS of `ragar bench sd`...]
#
# Variants (each `name:binary:extra args`, space-separated, in $VARIANTS; extra args joined by
# commas), each run when its binary is there. By default:
#   ragar              ragar's UNet and VAE decoder with its CUDA kernels (src/model/kernels.rs)
#   ragar_candle_ops   the same on candle's operations alone (--no-fused-kernels)
#   ct                 candle-transformers' UNet as it is (attention in f32, no TF32)
#
# ANCHOR defaults to ../shared/tools/sd_unet_anchor.py, then shared/tools/sd_unet_anchor.py. Only
# the repository travels to a device machine (a shared/ inside it does, the ../shared beside it
# does not): copy the anchor into an ignored folder of the repository and carry it, e.g.
#   mkdir -p .anchor && cp ../shared/tools/sd_unet_anchor.py .anchor/  (and .anchor in .git/info/exclude)
#   bash deploy/gpu/bench-sd.sh .anchor/sd_unet_anchor.py
# The anchor needs diffusers and importlib_metadata, which the machine's PyTorch lacks: wheels in
# .whl/ (carried; see the device notes) are installed into /tmp/site when present.
set -euo pipefail
cd "$(dirname "$0")/../.."

anchor=""
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
  anchor="$1"
  shift
fi
if [ -z "$anchor" ]; then
  for a in ../shared/tools/sd_unet_anchor.py shared/tools/sd_unet_anchor.py .anchor/sd_unet_anchor.py; do
    if [ -f "$a" ]; then anchor="$a"; break; fi
  done
fi

. deploy/gpu/cuda-libs.sh

out="${OUT:-target-gpu}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

status=0
for variant in ${VARIANTS:-ragar:ragar: ragar_candle_ops:ragar:--no-fused-kernels ct:ragar:--candle-transformers-unet,--no-tf32}; do
  IFS=: read -r name bin extra <<<"$variant"
  extra="${extra//,/ }"
  [ -x "target-gpu/$bin" ] || { echo "== $name: target-gpu/$bin not built, skipped"; continue; }
  echo "== candle $name: $bin bench sd $extra $*"
  # shellcheck disable=SC2086
  if ! "./target-gpu/$bin" bench sd $extra "$@" > "$out/candle_sd_$name.json"; then
    echo "candle $name failed" >&2
    rm -f "$out/candle_sd_$name.json"
    status=1
  fi
  cat "$out/candle_sd_$name.json" 2>/dev/null || true
done

if [ -z "$anchor" ] || [ ! -f "$anchor" ]; then
  echo "anchor not found (${anchor:-../shared/tools/sd_unet_anchor.py}): copy it into the repository and carry it; no ratios" >&2
  exit 2
fi
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
echo "== PyTorch/diffusers: $anchor"
PYTHONUNBUFFERED=1 ANCHOR_OUT="$out" python3 "$anchor"

python3 - "$out" <<'EOF'
import glob, json, os, sys
out = sys.argv[1]
anchor = json.load(open(os.path.join(out, "sd_anchor.json")))
ratios = {"gpu": anchor.get("gpu"), "torch": anchor.get("torch")}
fmt = lambda v, w, d=3: f"{v:>{w}.{d}f}" if isinstance(v, (int, float)) else f"{'-':>{w}}"
print(f"{'variant':<10}{'run':<16}{'candle s':>10}{'eager s':>10}{'compiled s':>12}{'candle/eager':>14}{'candle/compiled':>17}")
for path in sorted(glob.glob(os.path.join(out, "candle_sd_*.json"))):
    variant = os.path.basename(path)[len("candle_sd_"):-len(".json")]
    candle = json.load(open(path))
    for key in sorted(k for k in candle if k.startswith("candle_") and k.endswith("_s")):
        run = key[len("candle_"):-len("_s")]
        c = candle[key]
        e = anchor.get(f"eager_{run}_s")
        p = anchor.get(f"compiled_{run}_s")
        row = {"candle_s": c, "eager_s": e, "compiled_s": p,
               "candle_over_eager": c / e if e else None,
               "candle_over_compiled": c / p if p else None}
        ratios[f"{variant}/{run}"] = row
        print(f"{variant:<10}{run:<16}{fmt(c, 10)}{fmt(e, 10)}{fmt(p, 12)}{fmt(row['candle_over_eager'], 14, 2)}{fmt(row['candle_over_compiled'], 17, 2)}")
if "compile_error" in anchor:
    print("torch.compile failed:", anchor["compile_error"])
with open(os.path.join(out, "sd_ratios.json"), "w") as f:
    json.dump(ratios, f, indent=1)
EOF
exit "$status"
