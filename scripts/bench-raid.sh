#!/bin/bash
# Arrays (BENCHMARKS.md, issue 18), release build, `vnvme perf` over vfio-user, 4 KiB
# randread QD32, each pair of runs A/B alternating in one daemon:
#  1. raid0 of two malloc members vs one malloc namespace (two controllers on one busy
#     reactor pinned to CPU 0; perf on CPU 1);
#  2. raid1 reads over two NVMe/TCP targets vs one target, the members made the bottleneck
#     with the targets' QoS (iops_limit = LIMIT);
#  3. a full rebuild (raid1 of malloc members, one replaced) at RATE MB/s: its throughput
#     and the guest IOPS during it vs without.
# On a loaded machine single runs swing several-fold: part 1 takes ROUNDS (default 9)
# alternating pairs and reports the median ratio and each side's best.
#  4. raid0 of two `nvme:` members (back vnvmes over vfio-user) vs one `nvme:` namespace,
#     128 KiB randread QD8, and the members' zero-copy and bounced bytes.
# Usage: scripts/bench-raid.sh [SECS] [LIMIT] [RATE]   (PARTS="1 2 3 4" selects parts)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-5}
LIMIT=${2:-4000}
RATE=${3:-100}
PARTS=${PARTS:-1 2 3 4}
ROUNDS=${ROUNDS:-9}
part() { [[ " $PARTS " == *" $1 "* ]]; }
cargo build --release -q -p vnvme
BIN=$PWD/target/release/vnvme
D=$(mktemp -d /dev/shm/vnvme-rbench.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$D"
}
trap cleanup EXIT
wait_for() { for i in $(seq 100); do [ -S "$1" ] && return; sleep 0.1; done; echo "no $1"; exit 1; }
iops() { # perf SOCK: IOPS of the Total line
  RUST_LOG=warn taskset -c 1 $BIN perf "vfio-user:$1" -q 32 -o 4096 -w randread -t "$SECS" \
    | grep '^Total' | head -1 | tr -s ' ' | cut -d: -f2 | awk '{print $1}'
}

if part 1; then
echo "== 1. raid0 of 2 malloc vs malloc"
cat >"$D/a.toml" <<EOF
poll = "busy"
reactors = 1
[[array]]
name = "r0"
level = "raid0"
members = ["malloc:512M", "malloc:512M"]
[[controller]]
socket = "$D/malloc.sock"
[[controller.namespace]]
backend = "malloc:1G"
[[controller]]
socket = "$D/raid0.sock"
[[controller.namespace]]
backend = "array:r0"
EOF
taskset -c 0 $BIN serve --unsupervised --config "$D/a.toml" >"$D/a.log" 2>&1 &
PIDS+=($!)
wait_for "$D/raid0.sock"
: >"$D/ratios"; : >"$D/m"; : >"$D/r"
for round in $(seq "$ROUNDS"); do
  m=$(iops "$D/malloc.sock"); r=$(iops "$D/raid0.sock")
  echo "$m" >>"$D/m"; echo "$r" >>"$D/r"; echo "scale=3; $r / $m" | bc >>"$D/ratios"
  echo "bench raid0-vs-malloc round=$round malloc=$m raid0=$r ratio=$(tail -1 "$D/ratios")"
done
echo "bench raid0-vs-malloc median-ratio=$(sort -n "$D/ratios" | sed -n "$(( (ROUNDS + 1) / 2 ))p") best-malloc=$(sort -n "$D/m" | tail -1) best-raid0=$(sort -n "$D/r" | tail -1)"
kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true
fi

if part 2; then
echo "== 2. raid1 reads over two NVMe/TCP targets (iops_limit $LIMIT each) vs one"
for t in 1 2 3; do
  $BIN serve --unsupervised --tcp-listen 127.0.0.1:0 --nqn nqn.2026-11.io.vnvme:t$t --ns malloc:256M \
    --iops-limit "$LIMIT" >"$D/t$t.log" 2>&1 &
  PIDS+=($!)
done
for t in 1 2 3; do
  for i in $(seq 100); do grep -q 'serving NVMe/TCP on' "$D/t$t.log" && break; sleep 0.1; done
  eval "P$t=$(grep -o 'serving NVMe/TCP on [0-9.:]*' "$D/t$t.log" | awk -F: '{print $NF}')"
done
cat >"$D/b.toml" <<EOF
[[array]]
name = "r1"
level = "raid1"
members = ["nvme-tcp://127.0.0.1:$P1/nqn.2026-11.io.vnvme:t1/1", "nvme-tcp://127.0.0.1:$P2/nqn.2026-11.io.vnvme:t2/1"]
[[controller]]
socket = "$D/one.sock"
[[controller.namespace]]
backend = "nvme-tcp://127.0.0.1:$P3/nqn.2026-11.io.vnvme:t3/1"
[[controller]]
socket = "$D/raid1.sock"
[[controller.namespace]]
backend = "array:r1"
EOF
$BIN serve --unsupervised --config "$D/b.toml" --rpc "$D/b.rpc" >"$D/b.log" 2>&1 &
PIDS+=($!)
wait_for "$D/raid1.sock"
for round in $(seq "${RAID1_ROUNDS:-4}"); do
  o=$(iops "$D/one.sock"); r=$(iops "$D/raid1.sock")
  echo "bench raid1-reads round=$round one-member=$o raid1=$r ratio=$(echo "scale=3; $r / $o" | bc)"
done
$BIN rpc -s "$D/b.rpc" raid_list | grep -E '"(member|reads)"' | paste - - | sed 's/^/bench raid1-reads per member: /'
fi

if part 3; then
echo "== 3. full rebuild at $RATE MB/s under randread"
cat >"$D/c.toml" <<EOF
[[array]]
name = "m"
level = "raid1"
members = ["malloc:1G", "malloc:1G"]
rebuild_rate_mb = $RATE
[[controller]]
socket = "$D/m.sock"
[[controller.namespace]]
backend = "array:m"
EOF
taskset -c 0 $BIN serve --unsupervised --config "$D/c.toml" --rpc "$D/c.rpc" >"$D/c.log" 2>&1 &
PIDS+=($!)
wait_for "$D/m.sock"
base=$(iops "$D/m.sock")
$BIN rpc -s "$D/c.rpc" raid_remove_member name=m member=1 >/dev/null
$BIN rpc -s "$D/c.rpc" raid_add_member name=m member=malloc:1G >/dev/null
during=$(iops "$D/m.sock")
$BIN rpc -s "$D/c.rpc" raid_list | grep -A8 '"rebuild": {' | grep -E 'percent|bytes_copied|elapsed|eta' | tr -d ' \n'; echo
for i in $(seq 600); do
  $BIN rpc -s "$D/c.rpc" raid_list | grep -q '"finished": true' && break; sleep 0.5
done
$BIN rpc -s "$D/c.rpc" raid_list | grep -A12 '"last_rebuild"' | grep -E 'bytes_copied|elapsed_secs' | tr -d ' \n'; echo
echo "bench rebuild rate=${RATE}MB/s randread-iops without=$base during=$during ratio=$(echo "scale=3; $during / $base" | bc)"
fi

if part 4; then
# `nvme:` members: raid0 of two back vnvmes (vfio-user, RAM) behind the front vs one of them
# as a plain `nvme:` namespace; 128 KiB random reads QD8 (where a bounce copy costs most).
# The members' zero-copy and bounced bytes come from raid_list.
echo "== 4. raid0 of 2 nvme: members vs one nvme: namespace, 128 KiB randread QD8"
for b in 0 1 2; do
  $BIN serve --unsupervised --socket "$D/back$b.sock" --ns malloc:1G >"$D/back$b.log" 2>&1 &
  PIDS+=($!)
done
for b in 0 1 2; do wait_for "$D/back$b.sock"; done
printf '%s\n' 'poll = "busy"' 'reactors = 1' \
  '[[array]]' 'name = "n0"' 'level = "raid0"' \
  "members = [\"nvme:vfio-user:$D/back1.sock\", \"nvme:vfio-user:$D/back2.sock\"]" \
  '[[controller]]' "socket = \"$D/one.sock\"" '[[controller.namespace]]' \
  "backend = \"nvme:vfio-user:$D/back0.sock\"" \
  '[[controller]]' "socket = \"$D/arr.sock\"" '[[controller.namespace]]' 'backend = "array:n0"' \
  >"$D/d.toml"
$BIN serve --unsupervised --config "$D/d.toml" --rpc "$D/d.rpc" >"$D/d.log" 2>&1 &
PIDS+=($!)
wait_for "$D/arr.sock"
big() { # perf SOCK: IOPS of 128 KiB random reads at QD8
  RUST_LOG=warn $BIN perf "vfio-user:$1" -q 8 -o 131072 -w randread -t "$SECS" \
    | grep '^Total' | head -1 | tr -s ' ' | cut -d: -f2 | awk '{print $1}'
}
: >"$D/ratios4"
for round in $(seq "${ROUNDS4:-5}"); do
  o=$(big "$D/one.sock"); a=$(big "$D/arr.sock")
  echo "scale=3; $a / $o" | bc >>"$D/ratios4"
  echo "bench nvme-members round=$round one=$o raid0=$a ratio=$(tail -1 "$D/ratios4")"
done
echo "bench nvme-members median-ratio=$(sort -n "$D/ratios4" | sed -n "$(( ($(wc -l <"$D/ratios4") + 1) / 2 ))p")"
$BIN rpc -s "$D/d.rpc" raid_list | grep -E '"member"|zero_copy_bytes|bounced_bytes' | tr -d ' ,' | paste -sd' '
fi
