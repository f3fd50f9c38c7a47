#!/bin/bash
# Side-by-side host benchmark of two vnvme binaries (A/B, e.g. before and after a change):
# `vnvme serve --poll busy` pinned to CPU 0, `vnvme perf` (4 KiB randread) pinned to CPU 1,
# A and B alternating in every round so machine noise hits both alike. Prints IOPS per run
# and the B/A ratio of the medians per case.
# TRANSPORT=tcp: the servers run `serve --tcp-listen` with their default polling and the
# client is always B's `perf nvme-tcp://` (the NVMe/TCP target A/B).
# POLL_A / POLL_B: the vfio-user servers' --poll mode (default busy for both), e.g. to set
# the default (adaptive) against busy polling with one binary.
# SERVE_A / SERVE_B: more `serve` arguments for A or B, e.g. SERVE_B=--supervised to measure
# the state journal of a supervised worker (e.g. NSES=null:1G). Builds since 2026-12-05 serve
# supervised by default: SERVE_B=--unsupervised compares one process with an older A.
# Usage: [TRANSPORT=vfio-user|tcp] scripts/bench-ab.sh BIN_A BIN_B [SECS] [ROUNDS]
set -euo pipefail
A=$1 B=$2 SECS=${3:-4} ROUNDS=${4:-3}
D=$(mktemp -d /dev/shm/vnvme-ab.XXXXXX)
SRV=
trap '[ -n "$SRV" ] && kill $SRV 2>/dev/null; wait 2>/dev/null; rm -rf "$D"' EXIT
TRANSPORT=${TRANSPORT:-vfio-user}
PORT=${PORT:-14530}
NQN=nqn.2026-11.io.vnvme:ab
run() { # bin ns qd poll [serve args] -> IOPS
  rm -f "$D/s.sock"
  if [ "$TRANSPORT" = tcp ]; then
    taskset -c 0 "$1" serve --tcp-listen "127.0.0.1:$PORT" --nqn $NQN --ns "$2" >"$D/serve.log" 2>&1 &
    SRV=$!
    for _ in $(seq 50); do grep -q listening "$D/serve.log" 2>/dev/null && break; sleep 0.1; done
    RUST_LOG=warn taskset -c 1 "$B" perf "nvme-tcp://127.0.0.1:$PORT/$NQN/1" -q "$3" -o 4096 \
      -w randread -t "$SECS" >"$D/perf.out" 2>"$D/perf.err"
  else
    # shellcheck disable=SC2086 # $5: extra arguments, split on purpose
    taskset -c 0 "$1" serve --socket "$D/s.sock" --poll "$4" --ns "$2" ${5:-} >"$D/serve.log" 2>&1 &
    SRV=$!
    for _ in $(seq 50); do [ -S "$D/s.sock" ] && break; sleep 0.1; done
    RUST_LOG=warn taskset -c 1 "$1" perf "vfio-user:$D/s.sock" -q "$3" -o 4096 -w randread \
      -t "$SECS" >"$D/perf.out" 2>"$D/perf.err"
  fi
  kill $SRV; wait $SRV 2>/dev/null || true; SRV=
  grep '^Total' "$D/perf.out" | head -1 | tr -s ' ' | cut -d: -f2 | awk '{print $1}'
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
for ns in ${NSES:-null:1G malloc:1G}; do
  for qd in 1 32; do
    : >"$D/a" ; : >"$D/b"
    for r in $(seq "$ROUNDS"); do
      run "$A" "$ns" "$qd" "${POLL_A:-busy}" "${SERVE_A:-}" >>"$D/a"
      run "$B" "$ns" "$qd" "${POLL_B:-busy}" "${SERVE_B:-}" >>"$D/b"
    done
    ma=$(median <"$D/a"); mb=$(median <"$D/b")
    echo "ns=${ns%%:*} qd=$qd A: $(tr '\n' ' ' <"$D/a")| B: $(tr '\n' ' ' <"$D/b")| B/A median $(echo "scale=3; $mb / $ma" | bc)"
  done
done
