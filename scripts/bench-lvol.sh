#!/bin/bash
# Logical volumes (BENCHMARKS.md, issue 19), release build, `vnvme perf` over vfio-user,
# 4 KiB QD32, one busy reactor pinned to CPU 0, perf on CPU 1, A/B runs alternating:
#  1. a thick volume vs the raw backend it lives on (malloc, or with BASE=file tmpfs files
#     through io_uring), randwrite and randread, in one daemon;
#  2. first writes: randwrite on a fresh thin volume (every 4 KiB granule written for the
#     first time, a cluster allocated per 1 MiB) vs a thick one, and on the thick one
#     right after a snapshot (every first write to a cluster copies-on-write: a new top
#     layer); each round starts a fresh daemon (fresh RAM store);
#  3. load time of a store with 10,000 volumes and 1.05 M mapped clusters, and the volume
#     layer's own cost in process (pre-touched RAM, no controller): thick vs raw, first writes.
# Usage: scripts/bench-lvol.sh [SECS]   (PARTS="1 2 3" selects parts, ROUNDS rounds, BASE=file,
#        SUPERVISED=1: part 2 under serve --supervised)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-5}
PARTS=${PARTS:-1 2 3}
ROUNDS=${ROUNDS:-5}
part() { [[ " $PARTS " == *" $1 "* ]]; }
cargo build --release -q -p vnvme
BIN=$PWD/target/release/vnvme
D=$(mktemp -d /dev/shm/vnvme-lbench.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$D"
}
trap cleanup EXIT
wait_for() { for i in $(seq 100); do [ -S "$1" ] && return; sleep 0.1; done; echo "no $1"; exit 1; }
iops() { # perf SOCK PATTERN: IOPS of the Total line (errors are in perf's own output)
  { RUST_LOG=warn taskset -c 1 "$BIN" perf "vfio-user:$1" -q 32 -o 4096 -w "$2" -t "$SECS" || true; } \
    | grep '^Total' | head -1 | tr -s ' ' | cut -d: -f2 | awk '{print $1}'
}
warm() { # one sequential pass of 128 KiB writes over SOCK's namespace (RAM pages touched)
  RUST_LOG=warn taskset -c 1 "$BIN" perf "vfio-user:$1" -q 8 -o 131072 -w write -t "${2:-3}" >/dev/null 2>&1 || true
}
median() { sort -n "$1" | sed -n "$(( ($(wc -l <"$1") + 1) / 2 ))p"; }
echo "bench machine: $(nproc) cores, $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg)"

if part 1; then
# BASE=file: the raw namespace and the store on tmpfs files (io_uring) instead of RAM
if [ "${BASE:-malloc}" = file ]; then
  RAW="file:$D/raw.img:1G"; POOL="file:$D/pool.img:1100M"
  # pages that exist, as an SSD's blocks do: no first-write allocation on either side
  fallocate -l 1G "$D/raw.img"; fallocate -l 1100M "$D/pool.img"
else
  RAW="malloc:1G"; POOL="malloc:1100M"
fi
echo "== 1. thick volume vs raw ${BASE:-malloc}, 4 KiB QD32"
printf '%s\n' 'poll = "busy"' 'reactors = 1' \
  '[[lvstore]]' 'name = "pool"' "backend = \"$POOL\"" \
  '[[lvstore.volume]]' 'name = "thick"' 'size = "1G"' \
  '[[controller]]' "socket = \"$D/raw.sock\"" '[[controller.namespace]]' "backend = \"$RAW\"" \
  '[[controller]]' "socket = \"$D/lvol.sock\"" '[[controller.namespace]]' 'backend = "lvol:pool/thick"' \
  >"$D/a.toml"
taskset -c 0 "$BIN" serve --unsupervised --config "$D/a.toml" >"$D/a.log" 2>&1 &
PIDS+=($!)
wait_for "$D/lvol.sock"
warm "$D/raw.sock"; warm "$D/lvol.sock"
for w in randwrite randread; do
  : >"$D/ratios"
  for round in $(seq "$ROUNDS"); do
    r=$(iops "$D/raw.sock" $w); l=$(iops "$D/lvol.sock" $w)
    echo "scale=3; $l / $r" | bc >>"$D/ratios"
    echo "bench thick-vs-raw $w round=$round raw=$r thick=$l ratio=$(tail -1 "$D/ratios")"
  done
  echo "bench thick-vs-raw $w median-ratio=$(median "$D/ratios")"
done
kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true
fi

if part 2; then
echo "== 2. first writes: thin vs thick, and copy-on-write after a snapshot"
# the store on a tmpfs file whose pages exist (as an SSD's blocks do): first writes cost
# what the volume layer adds, not a RAM page fault; the thick volume gets one sequential
# pass before it is measured
printf '%s\n' 'poll = "busy"' 'reactors = 1' \
  '[[lvstore]]' 'name = "pool"' "backend = \"file:$D/pool.img:3200M\"" \
  '[[lvstore.volume]]' 'name = "thick"' 'size = "1G"' \
  '[[lvstore.volume]]' 'name = "thin"' 'size = "1G"' 'thin = true' \
  '[[controller]]' "socket = \"$D/thick.sock\"" '[[controller.namespace]]' 'backend = "lvol:pool/thick"' \
  '[[controller]]' "socket = \"$D/thin.sock\"" '[[controller.namespace]]' 'backend = "lvol:pool/thin"' \
  >"$D/b.toml"
: >"$D/thin"; : >"$D/cow"
for round in $(seq "$ROUNDS"); do
  rm -f "$D/b.rpc" "$D/pool.img"
  dd if=/dev/zero of="$D/pool.img" bs=1M count=3200 status=none
  # SUPERVISED=1: under a supervisor, where a mapping change is committed before its ack
  taskset -c 0 "$BIN" serve ${SUPERVISED:+--supervised} ${SUPERVISED:---unsupervised} --config "$D/b.toml" --rpc "$D/b.rpc" >"$D/b.log" 2>&1 &
  PIDS+=($!)
  wait_for "$D/thin.sock"
  warm "$D/thick.sock" 5
  k=$(iops "$D/thick.sock" randwrite); t=$(iops "$D/thin.sock" randwrite)
  "$BIN" rpc -s "$D/b.rpc" lvol_snapshot name=pool/thick snapshot_name=snap >/dev/null
  c=$(iops "$D/thick.sock" randwrite)
  echo "scale=3; $t / $k" | bc >>"$D/thin"; echo "scale=3; $c / $k" | bc >>"$D/cow"
  echo "bench first-writes round=$round thick=$k thin-first=$t cow-after-snapshot=$c thin/thick=$(tail -1 "$D/thin") cow/thick=$(tail -1 "$D/cow")"
  kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true
done
echo "bench first-writes median thin/thick=$(median "$D/thin") cow/thick=$(median "$D/cow")"
fi

if part 3; then
echo "== 3. load time (10,000 volumes, 1.05 M mapped clusters); the volume layer alone, in"
echo "   process on pre-touched RAM, no controller: thick vs raw, first writes"
cargo test --release -q -p volumes --lib lvol::tests::bench -- --ignored --nocapture --test-threads=1 2>&1 \
  | grep -o 'bench lvol.*'
fi
