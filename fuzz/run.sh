#!/usr/bin/env bash
# Fuzzes the event decoder and the image decoder for a bounded time each, starting from the
# committed seeds (fuzz/seeds/) plus the corpus grown by earlier runs, and prints the executions and
# what was found. Stable Rust: libFuzzer with coverage instrumentation, no sanitizer (`-s none`;
# the decoders are safe Rust, so a finding is a panic, an abort, a timeout or an allocation over
# the limit). A finding fails the run and leaves its input in fuzz/artifacts/TARGET/.
#
#   bash fuzz/run.sh [SECONDS_PER_TARGET]      # default 60
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-60}"

command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked --version 0.13.2
# Instrumented builds have their own flags; a directory of their own keeps them out of the
# service's incremental build.
target_dir="${RAGAR_FUZZ_TARGET_DIR:-$HOME/.cache/ragar-fuzz-target}"
build=(--sanitizer none --release --debug-assertions --target-dir "$target_dir")
cargo fuzz build "${build[@]}"

status=0
for t in event_decoder image_decoder; do
  corpus="$target_dir/corpus/$t"
  mkdir -p "$corpus" "artifacts/$t"
  log="$target_dir/$t.log"
  # -malloc_limit_mb: a single allocation beyond it is a finding (decompression bombs);
  # -timeout: one input taking longer than 10 s is a finding.
  if cargo fuzz run "${build[@]}" "$t" "$corpus" "seeds/$t" -- \
      -max_total_time="$secs" -max_len=65536 -timeout=10 \
      -rss_limit_mb=2048 -malloc_limit_mb=256 -print_final_stats=1 >"$log" 2>&1; then
    found=0
  else
    found=1; status=1
    tail -40 "$log"
  fi
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
  printf 'fuzz %-14s %ss  executions %s  corpus %s inputs  findings %s\n' \
    "$t" "$secs" "$execs" "$(ls "$corpus" | wc -l)" "$found"
done
exit "$status"
