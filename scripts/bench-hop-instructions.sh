#!/bin/bash
# Instructions per forwarded 4 KiB I/O (BENCHMARKS.md, issue 7), counted by valgrind's
# callgrind because this VM has no PMU. The measured server runs under callgrind, so it is
# the bottleneck and its reactor is busy nearly all the time: its instruction count divided
# by the I/Os the (native) client completed is the work per I/O, polling included. For a
# breakdown: callgrind_annotate --inclusive=yes on the reactor thread's file.
# Runs twice: the back server alone (malloc), then a front `nvme:` hop to a native back.
# Needs valgrind (apt-get install valgrind). Usage: scripts/bench-hop-instructions.sh [SECS]
# With VNVME_BIN=PATH it measures that binary (e.g. an older build, for an A/B) instead of
# building this tree's.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
if [ -z "${VNVME_BIN:-}" ]; then
  cargo build --release -q -p vnvme
fi
BIN=${VNVME_BIN:-./target/release/vnvme}
D=$(mktemp -d /dev/shm/vnvme-hop.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$D"' EXIT
wait_sock() { for _ in $(seq 150); do [ -S "$1" ] && return; sleep 0.2; done; echo "no $1" >&2; exit 1; }
perf_ios() {
  RUST_LOG=warn $BIN perf "vfio-user:$1" -q 32 -o 4096 -w randread -t "$SECS" 2>/dev/null |
    awk -v s="$SECS" '/^Total/ {printf "%d", $3 * s; exit}'
}
# the reactor thread is the one with the most instructions
reactor_ir() { grep -h '^summary' "$D"/cg."$1"-* | awk '{print $2}' | sort -n | tail -1; }
report() {
  local what=$1 pid=$2 ios=$3 ir
  ir=$(reactor_ir "$pid")
  echo "bench $what | $ios I/Os, reactor $ir instructions, $((ir / ios)) instructions per I/O"
}
valgrind --tool=callgrind --separate-threads=yes --callgrind-out-file="$D/cg.%p" \
  $BIN serve --socket "$D/back.sock" --ns malloc:1G >"$D/back.log" 2>&1 &
BACK=$!
wait_sock "$D/back.sock"
ios=$(perf_ios "$D/back.sock")
kill -INT $BACK; wait $BACK || true
report back-alone $BACK "$ios"

$BIN serve --socket "$D/back.sock" --ns malloc:1G >"$D/back.log" 2>&1 &
wait_sock "$D/back.sock"
valgrind --tool=callgrind --separate-threads=yes --callgrind-out-file="$D/cg.%p" \
  $BIN serve --socket "$D/front.sock" --ns "nvme:vfio-user:$D/back.sock" >"$D/front.log" 2>&1 &
FRONT=$!
wait_sock "$D/front.sock"
ios=$(perf_ios "$D/front.sock")
kill -INT $FRONT; wait $FRONT || true
report front-hop $FRONT "$ios"
