#!/bin/bash
# The main job on an embedded default: start the vnvme daemon with a 256 MiB RAM namespace
# and boot a Linux guest attached to it over vfio-user that runs nvme list and a short fio.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export PATH=$HOME/.cargo/bin:$PATH
cargo build --release -p vnvme
exec ./target/release/vnvme demo "$@"
