#!/bin/bash
# NVMe/TCP loopback benchmark (BENCHMARKS.md): vnvme's initiator (`vnvme perf nvme-tcp://...`,
# one thread, CPU 1) against vnvme's target (`vnvme serve --tcp-listen`, CPU 0: its event
# loop and the controller's reactor), 4 KiB randread at QD 1, 32, 128 on a null namespace.
# Side by side in the same run, the same namespace over vfio-user (`vnvme perf vfio-user:`)
# for the ratio. Prints IOPS, latency percentiles and the CPU share each process got.
# Usage: scripts/bench-tcp.sh [SECS]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-5}
cargo build --release -q -p vnvme
BIN=./target/release/vnvme
D=$(mktemp -d /dev/shm/vnvme-tcpbench.XXXXXX)
NQN=nqn.2026-11.io.vnvme:bench
PORT=${PORT:-14520}
SRV=
trap '[ -n "$SRV" ] && kill $SRV 2>/dev/null; wait 2>/dev/null; rm -rf "$D"' EXIT
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)
run() { # transport qd
  local s0 s1 t0 t1 srv tot pct url
  if [ "$1" = tcp ]; then url="nvme-tcp://127.0.0.1:$PORT/$NQN/1"; else url="vfio-user:$D/s.sock"; fi
  s0=$(ticks $SRV); t0=$(date +%s.%N)
  RUST_LOG=warn taskset -c 1 /usr/bin/time -f "client-cpu %P" $BIN perf "$url" \
    -q "$2" -o 4096 -w randread -t "$SECS" >"$D/perf.out" 2>"$D/perf.err"
  s1=$(ticks $SRV); t1=$(date +%s.%N)
  srv=$(echo "scale=0; 100 * ($s1 - $s0) / $HZ / ($t1 - $t0)" | bc)
  tot=$(grep '^Total' "$D/perf.out" | head -1 | tr -s ' ' | cut -d: -f2)
  pct=$(grep '^Total' "$D/perf.out" | tail -1 | tr -s ' ' | cut -d: -f2)
  echo "bench transport=$1 qd=$2 | IOPS MiB/s avg min max (us):$tot | p50 p90 p99 p99.9 p99.99 (us):$pct | server-cpu ${srv}% | $(grep client-cpu "$D/perf.err")"
}
for qd in 1 32 128; do
  taskset -c 0 $BIN serve --unsupervised --socket "$D/s.sock" --poll busy --ns null:1G >"$D/serve.log" 2>&1 &
  SRV=$!
  for i in $(seq 50); do [ -S "$D/s.sock" ] && break; sleep 0.1; done
  run vfio-user $qd
  kill $SRV; wait $SRV 2>/dev/null || true; rm -f "$D/s.sock"
  taskset -c 0 $BIN serve --unsupervised --tcp-listen 127.0.0.1:$PORT --nqn $NQN --ns null:1G >"$D/serve.log" 2>&1 &
  SRV=$!
  sleep 0.5
  run tcp $qd
  kill $SRV; wait $SRV 2>/dev/null || true; SRV=
done
