#!/bin/bash
# Instructions per I/O of vnvme's NVMe/RDMA initiator against its NVMe/TCP initiator
# (BENCHMARKS.md, issue 21), counted by valgrind's callgrind: this machine has no PMU and
# no RDMA device, so both run in a TCG guest against the Linux kernel's nvmet (one file
# subsystem with an RDMA port on Soft-RoCE and a TCP port on loopback). `vnvme perf` runs
# under callgrind, which makes it the bottleneck by far (the kernel target is not slowed):
# all its threads' instructions / the I/Os it completed = the initiator's work per I/O, taken
# as the difference between a run of SECS and one of 2 x SECS (start-up and teardown cancel).
# Needs valgrind on the host (its static tool binaries are copied into the guest).
# Usage: scripts/bench-rdma-instructions.sh [SECS] [QD]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
QD=${2:-32}
cargo build --release -q -p vnvme
D=$(mktemp -d /tmp/vnvme-rdma-cg.XXXXXX)
trap 'rm -rf "$D"' EXIT
VG=/usr/libexec/valgrind
# Debian's /usr/bin/valgrind is a wrapper script around valgrind.bin
VBIN=$(command -v valgrind.bin || command -v valgrind)
cp ./target/release/vnvme "$VG/callgrind-amd64-linux" "$VG/vgpreload_core-amd64-linux.so" \
  "$VG/default.supp" "$D/"
cp "$VBIN" "$D/valgrind"
cat >"$D/bench.sh" <<S
net_up
modprobe crc32_generic; modprobe rdma_rxe; modprobe ib_uverbs; modprobe rdma_ucm
modprobe nvmet; modprobe nvmet_rdma; modprobe nvmet_tcp
rdma link add rxe0 type rxe netdev eth0
N=nqn.2014-08.org.vnvme:cg
truncate -s 256M /tmp/disk.img
C=/sys/kernel/config/nvmet
mkdir \$C/subsystems/\$N; echo 1 > \$C/subsystems/\$N/attr_allow_any_host
mkdir \$C/subsystems/\$N/namespaces/1
echo -n /tmp/disk.img > \$C/subsystems/\$N/namespaces/1/device_path
echo 1 > \$C/subsystems/\$N/namespaces/1/buffered_io; echo 1 > \$C/subsystems/\$N/namespaces/1/enable
A=\$(ip -4 -o addr show eth0 | awk '{print \$4}' | cut -d/ -f1)
for p in "1 rdma \$A 4420" "2 tcp 127.0.0.1 4421"; do
  set -- \$p; mkdir \$C/ports/\$1; echo \$2 > \$C/ports/\$1/addr_trtype; echo ipv4 > \$C/ports/\$1/addr_adrfam
  echo \$3 > \$C/ports/\$1/addr_traddr; echo \$4 > \$C/ports/\$1/addr_trsvcid
  ln -s \$C/subsystems/\$N \$C/ports/\$1/subsystems/\$N
done
for secs in $SECS $((2 * SECS)); do for t in "rdma \$A:4420" "tcp 127.0.0.1:4421"; do
  set -- \$t
  rm -f /tmp/cg.*
  iops=\$(VALGRIND_LIB=/tmp/h /tmp/h/valgrind --tool=callgrind --separate-threads=yes \
    --callgrind-out-file=/tmp/cg.\$1.%p /tmp/h/vnvme perf "nvme-\$1://\$2/\$N/1" -q $QD -o 4096 \
    -w randread -t \$secs 2>/dev/null | awk '/^Total/ {print \$3; exit}')
  ir=\$(cat /tmp/cg.\$1.* | awk '/^summary/ {s += \$2} END {printf "%d", s}')
  echo "bench \$1 secs \$secs iops \$iops instructions \$ir"
done; done
S
./target/release/vnvme guest --script "$D/bench.sh" --reach-host --smp 2 --mem 1536 \
  --timeout 900 --file "$D/vnvme" --file "$D/valgrind" --file "$D/callgrind-amd64-linux" \
  --file "$D/vgpreload_core-amd64-linux.so" --file "$D/default.supp" | grep '^bench' |
  # per transport: the short and the long run; the difference leaves out what a run costs
  # whatever its length (start, connect, registration, teardown)
  awk '{ ios = $6 * $4; n[$2]++; i[$2, n[$2]] = ios; r[$2, n[$2]] = $8
    printf "bench %s | %d s: %.0f IOPS, %d I/Os, %d instructions\n", $2, $4, $6, ios, $8 }
    END { for (t in n) if (n[t] == 2 && i[t, 2] > i[t, 1]) {
            per[t] = (r[t, 2] - r[t, 1]) / (i[t, 2] - i[t, 1])
            printf "bench %s | %.0f instructions per I/O\n", t, per[t] }
          if (per["tcp"] > 0) printf "bench rdma / tcp instructions per I/O: %.2f\n", per["rdma"] / per["tcp"] }'
