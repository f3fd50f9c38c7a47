#!/bin/bash
# Guest-side benchmark (BENCHMARKS.md): one TCG guest sees vnvme (malloc namespace) and
# QEMU's own nvme (raw image on tmpfs) side by side; fio 4k randread, io_uring, QD32, run on
# each in turn, twice, alternating. Prints IOPS per run. Usage: scripts/bench-guest.sh [SECS]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
cargo build --release -q -p vnvme
D=$(mktemp -d /dev/shm/vnvme-bench.XXXXXX)
trap 'kill $SRV 2>/dev/null; wait $SRV 2>/dev/null; rm -rf "$D"' EXIT
./target/release/vnvme serve --socket "$D/v.sock" --ns malloc:1G >"$D/serve.log" 2>&1 &
SRV=$!
for i in $(seq 50); do [ -S "$D/v.sock" ] && break; sleep 0.1; done
cat > "$D/bench.sh" <<S
for i in \$(seq 100); do [ -b /dev/nvme0n1 ] && [ -b /dev/nvme1n1 ] && break; sleep 0.1; done
for c in /sys/class/nvme/nvme*; do case \$(cat \$c/model) in QEMU*) Q=/dev/\$(basename \$c)n1 ;; vnvme*) V=/dev/\$(basename \$c)n1 ;; esac; done
dd if=/dev/zero of=\$Q bs=1M count=256 oflag=direct 2>/dev/null; dd if=/dev/zero of=\$V bs=1M count=256 oflag=direct 2>/dev/null
for round in 1 2; do for dev in \$V \$Q; do
  name=vnvme; [ \$dev = \$Q ] && name=qemu-nvme
  iops=\$(fio --name=b --filename=\$dev --direct=1 --ioengine=io_uring --rw=randread --bs=4k --iodepth=32 --size=256M --runtime=$SECS --time_based --output-format=terse --terse-version=3 | cut -d';' -f8)
  echo "bench \$name round \$round iops \$iops"
done; done
S
./target/release/vnvme guest --script "$D/bench.sh" --vfio-user "$D/v.sock" --nvme "$D/q.img" --timeout 600 | grep '^bench'
