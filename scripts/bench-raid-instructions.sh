#!/bin/bash
# Instructions per 4 KiB randread (QD32) on a raid0 of two malloc members vs one malloc
# namespace (BENCHMARKS.md, issue 18), counted by valgrind's callgrind (this VM has no PMU,
# and wall-clock IOPS swing several-fold when other jobs share the machine). The server runs
# under callgrind, so its reactor is busy nearly all the time: the reactor thread's
# instructions divided by the I/Os the (native) client completed is the work per I/O,
# polling included. Usage: scripts/bench-raid-instructions.sh [SECS]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
cargo build --release -q -p vnvme
BIN=./target/release/vnvme
D=$(mktemp -d /dev/shm/vnvme-rins.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$D"' EXIT
wait_sock() { for _ in $(seq 150); do [ -S "$1" ] && return; sleep 0.2; done; echo "no $1" >&2; exit 1; }
perf_ios() {
  RUST_LOG=warn $BIN perf "vfio-user:$1" -q 32 -o 4096 -w randread -t "$SECS" 2>/dev/null |
    awk -v s="$SECS" '/^Total/ {printf "%d", $3 * s; exit}'
}
# the reactor thread is the one with the most instructions
reactor_ir() { grep -h '^summary' "$D"/cg."$1"-* | awk '{print $2}' | sort -n | tail -1; }
all_ir() { grep -h '^summary' "$D"/cg."$1"-* | awk '{s += $2} END {printf "%d", s}'; }
cat >"$D/raid0.toml" <<EOF
[[array]]
name = "r0"
level = "raid0"
members = ["malloc:512M", "malloc:512M"]
[[controller]]
socket = "$D/s.sock"
[[controller.namespace]]
backend = "array:r0"
EOF
for what in malloc raid0; do
  rm -f "$D/s.sock"
  if [ $what = malloc ]; then args=(--socket "$D/s.sock" --ns malloc:1G); else args=(--config "$D/raid0.toml"); fi
  valgrind --tool=callgrind --separate-threads=yes --callgrind-out-file="$D/cg.%p" \
    $BIN serve --unsupervised "${args[@]}" >"$D/$what.log" 2>&1 &
  PID=$!
  wait_sock "$D/s.sock"
  ios=$(perf_ios "$D/s.sock")
  kill -INT $PID; wait $PID || true
  ir=$(reactor_ir $PID); all=$(all_ir $PID)
  echo "bench $what | $ios I/Os, reactor $ir instructions, $((ir / ios)) per I/O (all threads $((all / ios)))"
done
