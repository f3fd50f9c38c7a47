#!/bin/bash
# Install what vnvme needs on a Debian/Ubuntu machine (run as root): build tools, a Rust
# toolchain if none is present, and the cached VM test harness (QEMU 11 + guest image,
# in $VNVME_CACHE, default ~/.cache/vnvme). Safe to run again: finished steps are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
for p in gcc:build-essential debootstrap:debootstrap curl:curl pkg-config:pkg-config; do
  command -v "${p%%:*}" >/dev/null || need+=("${p#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "vnvme setup: installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" ca-certificates >/dev/null
fi
if ! command -v cargo >/dev/null; then
  [ -x "$HOME/.cargo/bin/cargo" ] || {
    echo "vnvme setup: installing Rust with rustup" >&2
    curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c clippy,rustfmt
  }
  export PATH=$HOME/.cargo/bin:$PATH
fi
bash qemu-harness/scripts/build-harness.sh
