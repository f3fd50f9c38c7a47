#!/bin/bash
# Instructions per 4 KiB I/O of the data plane with and without the state journal of a
# supervised worker (BENCHMARKS.md, issue 20), counted by valgrind's callgrind (this VM has
# no PMU; wall-clock IOPS on a shared 2-core machine vary 2-5x between runs). The measured
# server runs under callgrind, so its reactor is busy nearly all the time: the reactor
# thread's instructions / the I/Os the native client completed = work per I/O.
# Cases: A = BIN_A `serve $A_ARGS` (e.g. main; A_ARGS=--unsupervised for a build that serves
# supervised by default, as every build since 2026-12-05 does), B = BIN_B `serve
# --unsupervised`, C = BIN_B `serve --supervised`
# (the worker, followed across execve, keeps the journal). Namespace null:1G, client `vnvme perf -q QD -o 4096 -w randread`.
# Usage: scripts/bench-journal-instructions.sh BIN_A BIN_B [SECS] [QD]
set -euo pipefail
A=$1 B=$2 SECS=${3:-10} QD=${4:-32}
D=$(mktemp -d /dev/shm/vnvme-jr.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$D"' EXIT
wait_sock() { for _ in $(seq 300); do [ -S "$1" ] && return; sleep 0.2; done; echo "no $1" >&2; exit 1; }
measure() { # name bin [serve args]
  local name=$1 bin=$2; shift 2
  rm -rf "$D/run"; mkdir -p "$D/run"
  valgrind --tool=callgrind --separate-threads=yes --trace-children=yes \
    --callgrind-out-file="$D/run/cg.%p" \
    "$bin" serve --socket "$D/run/s.sock" --ns null:1G "$@" >"$D/run/serve.log" 2>&1 &
  local srv=$!
  wait_sock "$D/run/s.sock"
  sleep 3 # the supervised worker starts after the socket exists
  local ios
  ios=$(RUST_LOG=warn "$B" perf "vfio-user:$D/run/s.sock" -q "$QD" -o 4096 -w randread \
    -t "$SECS" 2>/dev/null | awk -v s="$SECS" '/^Total/ {printf "%d", $3 * s; exit}')
  kill -INT $srv; wait $srv || true
  sleep 2
  # the reactor thread is the one with the most instructions (in the worker when supervised)
  local ir
  ir=$(grep -h '^summary' "$D"/run/cg.* | awk '{print $2}' | sort -n | tail -1)
  echo "bench $name | $ios I/Os, reactor $ir instructions, $((ir / ios)) instructions per I/O"
}
measure A "$A" ${A_ARGS:-}
measure B "$B" --unsupervised
measure C-supervised "$B" --supervised
