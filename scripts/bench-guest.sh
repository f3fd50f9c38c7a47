#!/bin/bash
# Guest-side benchmark (BENCHMARKS.md): one TCG guest sees two vnvme controllers (malloc
# namespaces; one with interrupt coalescing off, an interrupt per poll pass, and one with
# COALESCE, default 16/200: the daemon's default) and QEMU's own nvme (raw image on tmpfs) side by side; fio 4k randread, io_uring,
# QD32 (QD1 too), each device in turn, twice, alternating. Prints IOPS per run, then each
# vnvme controller's ratio to QEMU's nvme per depth and round.
# Usage: scripts/bench-guest.sh [SECS] [COALESCE=ENTRIES/MICROSECONDS] [VCPUS]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
COALESCE=${2:-16/200}
VCPUS=${3:-2}
cargo build --release -q -p vnvme
D=$(mktemp -d /dev/shm/vnvme-bench.XXXXXX)
trap 'kill $SRV1 $SRV2 2>/dev/null; wait 2>/dev/null; rm -rf "$D"' EXIT
./target/release/vnvme serve --socket "$D/v.sock" --serial VNVMEPLAIN --irq-coalescing off --ns malloc:1G >"$D/serve1.log" 2>&1 &
SRV1=$!
./target/release/vnvme serve --socket "$D/c.sock" --serial VNVMECOAL --irq-coalescing "$COALESCE" --ns malloc:1G >"$D/serve2.log" 2>&1 &
SRV2=$!
for i in $(seq 50); do [ -S "$D/v.sock" ] && [ -S "$D/c.sock" ] && break; sleep 0.1; done
cat > "$D/bench.sh" <<S
for i in \$(seq 100); do [ -b /dev/nvme0n1 ] && [ -b /dev/nvme1n1 ] && [ -b /dev/nvme2n1 ] && break; sleep 0.1; done
for c in /sys/class/nvme/nvme*; do
  case \$(cat \$c/serial) in *VNVMEPLAIN*) V=/dev/\$(basename \$c)n1 ;; *VNVMECOAL*) C=/dev/\$(basename \$c)n1 ;; *) Q=/dev/\$(basename \$c)n1 ;; esac
done
for dev in \$V \$C \$Q; do dd if=/dev/zero of=\$dev bs=1M count=256 oflag=direct 2>/dev/null; done
for qd in 32 1; do for round in 1 2; do for dev in \$V \$C \$Q; do
  name=vnvme; [ \$dev = \$C ] && name=vnvme-coalesce; [ \$dev = \$Q ] && name=qemu-nvme
  iops=\$(fio --name=b --filename=\$dev --direct=1 --ioengine=io_uring --rw=randread --bs=4k --iodepth=\$qd --size=256M --runtime=$SECS --time_based --output-format=terse --terse-version=3 | cut -d';' -f8)
  echo "bench qd \$qd \$name round \$round iops \$iops"
done; done; done
S
./target/release/vnvme guest --script "$D/bench.sh" --vfio-user "$D/v.sock" --vfio-user "$D/c.sock" \
  --nvme "$D/q.img" --smp "$VCPUS" --timeout 900 | grep '^bench' | tee "$D/results"
# each round's ratios against QEMU's nvme, measured in that round
awk '{ iops[$3, $4, $6] = $8 }
  END {
    for (k in iops) {
      split(k, f, SUBSEP)
      if (f[2] != "qemu-nvme" && iops[f[1], "qemu-nvme", f[3]] > 0)
        printf "ratio qd %s round %s %s / qemu-nvme %.2f\n", f[1], f[3], f[2],
          iops[k] / iops[f[1], "qemu-nvme", f[3]]
    }
  }' "$D/results" | sort -k3,3nr -k5,5n -k6,6
