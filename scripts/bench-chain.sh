#!/bin/bash
# Forwarding-hop benchmark (BENCHMARKS.md, issue 7): `vnvme perf` 4 KiB randread against a
# back `vnvme serve` (malloc) alone, then through a front `vnvme serve --ns nvme:vfio-user:`
# to the same back, same client, same run. The machine has 2 cores and the chain needs 3
# pollers, so besides IOPS the script reports the front's cost per I/O in CPU time and in
# instructions (perf stat), which do not depend on who else runs.
# Usage: scripts/bench-chain.sh [SECS] [QD]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-5}
QD=${2:-32}
cargo build --release -q -p vnvme
BIN=./target/release/vnvme
D=$(mktemp -d /dev/shm/vnvme-chain.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$D"' EXIT
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)
$BIN serve --unsupervised --socket "$D/back.sock" --ns malloc:1G >"$D/back.log" 2>&1 &
for i in $(seq 50); do [ -S "$D/back.sock" ] && break; sleep 0.1; done
run() { RUST_LOG=warn $BIN perf "vfio-user:$1" -q "$QD" -o 4096 -w randread -t "$SECS" 2>/dev/null; }
alone=$(run "$D/back.sock" | grep '^Total' | head -1 | tr -s ' ' | cut -d: -f2)
echo "bench back-alone qd=$QD | IOPS MiB/s avg min max (us):$alone"
$BIN serve --unsupervised --socket "$D/front.sock" --ns "nvme:vfio-user:$D/back.sock" >"$D/front.log" 2>&1 &
FRONT=$!
for i in $(seq 50); do [ -S "$D/front.sock" ] && break; sleep 0.1; done
t0=$(ticks $FRONT)
perf stat -x, -e instructions -p $FRONT -o "$D/stat" -- sleep $((SECS + 2)) &
STAT=$!
out=$(run "$D/front.sock")
wait $STAT
t1=$(ticks $FRONT)
chain=$(echo "$out" | grep '^Total' | head -1 | tr -s ' ' | cut -d: -f2)
ios=$(echo "$chain" | awk -v s="$SECS" '{printf "%d", $1 * s}')
insn=$(grep instructions "$D/stat" | cut -d, -f1)
cpu_ns=$(( (t1 - t0) * 1000000000 / HZ ))
echo "bench chain qd=$QD | IOPS MiB/s avg min max (us):$chain"
case "$insn" in
  ''|*[!0-9]*) insn_per_io="n/a (no PMU: perf stat says '$insn')" ;;
  *) insn_per_io=$((insn / ios)) ;;
esac
echo "bench front-hop qd=$QD | $((cpu_ns / ios)) ns of front CPU per I/O (polling included), instructions per I/O: $insn_per_io ($ios I/Os)"
