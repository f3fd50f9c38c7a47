#!/bin/bash
# Forwarding hop, wall clock, two builds side by side (BENCHMARKS.md, issue 17): a back
# `vnvme serve --ns malloc:1G` and a front `vnvme serve --ns nvme:vfio-user:` to it, both
# pinned to CPU 0 (they share it, as the three pollers of a chain must on 2 cores), and
# `vnvme perf` 4 KiB randread pinned to CPU 1, A and B alternating in every round. Each
# build serves with its own binary and drives with its own `perf`. Prints IOPS per run and
# the B/A ratio of the medians per queue depth.
# Usage: scripts/bench-hop-ab.sh BIN_A BIN_B [SECS] [ROUNDS] [QDS, e.g. "1 32"]
set -euo pipefail
A=$1; B=$2; SECS=${3:-3}; ROUNDS=${4:-3}; QDS=${5:-1 32}
D=$(mktemp -d /dev/shm/vnvme-hop-ab.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$D"' EXIT
wait_sock() { for _ in $(seq 100); do [ -S "$1" ] && return; sleep 0.1; done; echo "no $1" >&2; exit 1; }
# IOPS of one hop run of binary $1 at queue depth $2
hop() {
  local bin=$1 qd=$2 back front
  taskset -c 0 "$bin" serve --unsupervised --socket "$D/back.sock" --ns malloc:1G >"$D/back.log" 2>&1 &
  back=$!
  wait_sock "$D/back.sock"
  taskset -c 0 "$bin" serve --unsupervised --socket "$D/front.sock" \
    --ns "nvme:vfio-user:$D/back.sock" >"$D/front.log" 2>&1 &
  front=$!
  wait_sock "$D/front.sock"
  RUST_LOG=warn taskset -c 1 "$bin" perf "vfio-user:$D/front.sock" -q "$qd" -o 4096 \
    -w randread -t "$SECS" 2>/dev/null | awk '/^Total/ {print $3; exit}'
  kill -INT "$front"; wait "$front" || true
  kill -INT "$back"; wait "$back" || true
  rm -f "$D/back.sock" "$D/front.sock"
}
median() { tr ' ' '\n' | grep . | sort -g | awk '{v[NR]=$1} END {print (NR % 2) ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2}'; }
for qd in $QDS; do
  ra=""; rb=""
  for _ in $(seq "$ROUNDS"); do
    ra="$ra $(hop "$A" "$qd")"
    rb="$rb $(hop "$B" "$qd")"
  done
  ma=$(echo "$ra" | median); mb=$(echo "$rb" | median)
  echo "hop qd=$qd A:$ra | B:$rb | B/A median $(awk -v a="$ma" -v b="$mb" 'BEGIN {printf "%.3f", b / a}')"
done
