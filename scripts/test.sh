#!/bin/bash
# The whole test suite: formatting, clippy, unit tests, host-side vfio-user tests and the
# real-QEMU guest tests (installs the harness on first run; TCG when KVM is unusable).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export PATH=$HOME/.cargo/bin:$PATH
echo "== cargo fmt --check" >&2
cargo fmt --all -- --check
echo "== cargo clippy" >&2
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo test" >&2
cargo test --workspace -- --test-threads=1
