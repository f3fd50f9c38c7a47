#!/bin/bash
# Host-side benchmark (BENCHMARKS.md): `vnvme perf` over vfio-user against `vnvme serve`,
# server pinned to CPU 0 (busy polling), client pinned to CPU 1; 4 KiB randread at QD 1, 32
# and 128 on a null and a malloc namespace. Prints IOPS, latency and the CPU share each
# process got (a run where either got less than ~95 % of its core is noise).
# Usage: scripts/bench-host.sh [SECS]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-5}
cargo build --release -q -p vnvme
BIN=./target/release/vnvme
D=$(mktemp -d /dev/shm/vnvme-hbench.XXXXXX)
SRV=
trap '[ -n "$SRV" ] && kill $SRV 2>/dev/null; wait 2>/dev/null; rm -rf "$D"' EXIT
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)
for ns in null:1G malloc:1G; do
  rm -f "$D/s.sock"
  taskset -c 0 $BIN serve --unsupervised --socket "$D/s.sock" --poll busy --ns "$ns" >"$D/serve.log" 2>&1 &
  SRV=$!
  for i in $(seq 50); do [ -S "$D/s.sock" ] && break; sleep 0.1; done
  for qd in 1 32 128; do
    s0=$(ticks $SRV); t0=$(date +%s.%N)
    RUST_LOG=warn taskset -c 1 /usr/bin/time -f "client-cpu %P" $BIN perf "vfio-user:$D/s.sock" \
      -q $qd -o 4096 -w randread -t "$SECS" >"$D/perf.out" 2>"$D/perf.err"
    s1=$(ticks $SRV); t1=$(date +%s.%N)
    srv=$(echo "scale=0; 100 * ($s1 - $s0) / $HZ / ($t1 - $t0)" | bc)
    tot=$(grep '^Total' "$D/perf.out" | head -1 | tr -s ' ' | cut -d: -f2)
    pct=$(grep '^Total' "$D/perf.out" | tail -1 | tr -s ' ' | cut -d: -f2)
    echo "bench ns=${ns%%:*} qd=$qd | IOPS MiB/s avg min max (us):$tot | p50 p90 p99 p99.9 p99.99 (us):$pct | server-cpu ${srv}% | $(grep client-cpu "$D/perf.err")"
  done
  kill $SRV; wait $SRV 2>/dev/null || true; SRV=
done
