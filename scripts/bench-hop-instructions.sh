#!/bin/bash
# Instructions per forwarded 4 KiB I/O (BENCHMARKS.md, issue 7), counted by valgrind's
# callgrind because this VM has no PMU. The measured server runs under callgrind, so it is
# the bottleneck and its reactor is busy nearly all the time: its instruction count divided
# by the commands it took (counted in the profile) is the work per I/O, polling included. For a
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
reactor_file() {
  grep -H '^summary' "$D"/cg."$1"-* | sort -t' ' -k2 -n | tail -1 | cut -d: -f1
}
# commands the server took (calls of a backend's `execute`, one per read or write; in a
# build before 2026-12-05 calls of the data-pointer walk), counted in the profile itself:
# the client's IOPS figure can miss I/Os done outside its window
commands() {
  python3 - "$1" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
names = ['Backend>::execute', 'backend::Backend::execute']
if not any(n in text for n in names):
    names = ['device_model::dptr::map_data']
ids, calls, cur = set(), 0, None
for line in text.splitlines():
    m = re.match(r'c?fn=\((\d+)\)(?: (.*))?', line)
    if m:
        if m.group(2) and any(n in m.group(2) for n in names):
            ids.add(m.group(1))
        cur = m.group(1) if line.startswith('cfn=') else None
        continue
    m = re.match(r'calls=(\d+)', line)
    if m and cur in ids:
        calls += int(m.group(1))
    cur = None
print(calls)
PY
}
report() {
  local what=$1 pid=$2 ios=$3 f ir cmds
  f=$(reactor_file "$pid")
  ir=$(grep -h '^summary' "$f" | awk '{print $2}')
  cmds=$(commands "$f")
  echo "bench $what | $ios I/Os by the client, $cmds commands, reactor $ir instructions," \
    "$((ir / cmds)) instructions per command"
}
valgrind --tool=callgrind --separate-threads=yes --callgrind-out-file="$D/cg.%p" \
  $BIN serve --unsupervised --socket "$D/back.sock" --ns malloc:1G >"$D/back.log" 2>&1 &
BACK=$!
wait_sock "$D/back.sock"
ios=$(perf_ios "$D/back.sock")
kill -INT $BACK; wait $BACK || true
report back-alone $BACK "$ios"

$BIN serve --unsupervised --socket "$D/back.sock" --ns malloc:1G >"$D/back.log" 2>&1 &
wait_sock "$D/back.sock"
valgrind --tool=callgrind --separate-threads=yes --callgrind-out-file="$D/cg.%p" \
  $BIN serve --unsupervised --socket "$D/front.sock" --ns "nvme:vfio-user:$D/back.sock" >"$D/front.log" 2>&1 &
FRONT=$!
wait_sock "$D/front.sock"
ios=$(perf_ios "$D/front.sock")
kill -INT $FRONT; wait $FRONT || true
report front-hop $FRONT "$ios"
