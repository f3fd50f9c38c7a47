#!/bin/bash
# Scale benchmark (BENCHMARKS.md, issue 6): one `vnvme serve` process with 128 controllers
# (null namespaces) on ONE shared reactor thread pinned to CPU 0; `vnvme perf-many` pinned
# to CPU 1 drives the first N controllers from one thread (QD 8 each, 4 KiB randread) for
# N = 1, 8, 32, 128. Also prints the time to bring the 128 controllers up and the server's
# resident memory per idle controller.
# Usage: scripts/bench-scale.sh [SECS]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-5}
cargo build --release -q -p vnvme
BIN=./target/release/vnvme
D=$(mktemp -d /dev/shm/vnvme-scale.XXXXXX)
SRV=
trap '[ -n "$SRV" ] && kill $SRV 2>/dev/null; wait 2>/dev/null; rm -rf "$D"' EXIT
{
  echo 'reactors = 1'
  for i in $(seq 0 127); do
    printf '[[controller]]\nsocket = "%s/c%d.sock"\n[[controller.namespace]]\nbackend = "null:1G"\n' "$D" "$i"
  done
} > "$D/scale.toml"
t0=$(date +%s.%N)
RUST_LOG=warn taskset -c 0 $BIN serve --unsupervised --config "$D/scale.toml" >"$D/serve.log" 2>&1 &
SRV=$!
while [ "$(ls "$D"/*.sock 2>/dev/null | wc -l)" -lt 128 ]; do sleep 0.01; done
t1=$(date +%s.%N)
sleep 1
rss=$(awk '/VmRSS/ {print $2}' /proc/$SRV/status)
echo "bench scale: 128 controllers listening after $(echo "($t1 - $t0) * 1000" | bc | cut -d. -f1) ms (process start included); server RSS ${rss} KiB idle = $((rss / 128)) KiB per controller"
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)
for n in 1 8 32 128; do
  targets=$(for i in $(seq 0 $((n - 1))); do printf 'vfio-user:%s/c%d.sock ' "$D" "$i"; done)
  s0=$(ticks $SRV); a=$(date +%s.%N)
  # shellcheck disable=SC2086
  out=$(RUST_LOG=warn taskset -c 1 $BIN perf-many -q 8 -t "$SECS" $targets)
  s1=$(ticks $SRV); b=$(date +%s.%N)
  echo "bench scale: $out | server-cpu $(echo "scale=0; 100 * ($s1 - $s0) / $HZ / ($b - $a)" | bc)%"
done
