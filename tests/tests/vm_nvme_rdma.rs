//! NVMe over RDMA on Soft-RoCE, in one guest (this machine has no RDMA device; the guest
//! kernel has `rdma_rxe`): vnvme's daemon runs in the guest with `--rdma-listen`, and the
//! Linux kernel's own NVMe/RDMA host (`nvme discover` / `nvme connect -t rdma`) uses it: the
//! discovery log lists the RDMA port, fio writes and verifies (crc32c) over it, Identify
//! shows the fabric fields, and the host disconnects cleanly. The same target is then
//! measured over RDMA and over NVMe/TCP (fio 4 KiB random reads) for BENCHMARKS.md; a
//! second daemon exports over NVMe/RDMA alone (no `--tcp-listen`) and is discovered (by
//! nvme-cli and by `vnvme discover -t rdma`), connected, written and read back. Before any RDMA link exists
//! the daemon refuses `--rdma-listen` with the "no RDMA device; load rdma_rxe" error; a
//! hostile host (`src/bin/rdma_hostile_peer.rs`: a connect request for too large a queue, a
//! short capsule, a keyed SGL with a key never registered, more commands than queue
//! entries) is refused or disconnected before the kernel host uses the same target. Last, a
//! supervised export (`serve --supervised --rdma-listen`) has its worker upgraded and killed
//! under the kernel host's fio verify: the host reconnects, fio reports no error.

use vnvme_tests::guest::{
    TempDir, harness_guest, run_ok, section, value, vnvme_binary_for_guest, with_private_nic,
};

const NQN: &str = "nqn.2026-11.io.vnvme:rdma-target";

const SCRIPT: &str = r#"
net_up
# the block device of the connected controller of subsystem $1 (waits up to 10 s)
dev_of() {
  for i in $(seq 1 100); do
    for c in /sys/class/nvme/nvme*; do
      [ "$(cat $c/subsysnqn 2>/dev/null)" = "$1" ] && [ -b /dev/$(basename $c)n1 ] \
        && { echo /dev/$(basename $c)n1; return; }
    done
    sleep 0.1
  done
}
modprobe crc32_generic; modprobe rdma_rxe; modprobe ib_uverbs; modprobe rdma_ucm; modprobe nvme_rdma
echo @@NODEV-BEGIN
rc=0; RUST_LOG=warn /tmp/h/vnvme serve --tcp-listen 127.0.0.1:4421 --rdma-listen 127.0.0.1:4420 \
  --ns malloc:1M 2>&1 || rc=$?
echo; echo "nodev-rc $rc"
echo @@NODEV-END
# Soft-RoCE on the guest's NIC (RoCE v2 over UDP; host and target are both in this guest)
rdma link add rxe0 type rxe netdev eth0
rdma link show
(RUST_LOG=info /tmp/h/vnvme serve --tcp-listen 127.0.0.1:4421 --rdma-listen $ADDR:4420 \
  --nqn $NQN --ns malloc:64M > /tmp/daemon.log 2>&1 &)
for i in $(seq 1 100); do grep -q "nvme-rdma target: listening" /tmp/daemon.log && break; sleep 0.1; done
echo @@HOSTILE-BEGIN
rc=0; /tmp/h/rdma_hostile_peer $ADDR:4420 $NQN || rc=$?
echo "hostile-rc $rc"
echo @@HOSTILE-END
echo @@DISC-BEGIN
rc=0; nvme discover -t rdma -a $ADDR -s 4420 || rc=$?
echo; echo "discover-rc $rc"
echo @@DISC-END
rc=0; nvme connect -t rdma -a $ADDR -s 4420 -n $NQN -k 5 || rc=$?
echo; echo "connect-rc $rc"
for i in $(seq 1 100); do [ -b /dev/nvme0n1 ] && break; sleep 0.1; done
echo "size $(cat /sys/block/nvme0n1/size)"
echo "transport $(cat /sys/class/nvme/nvme0/transport)"
echo @@ID-BEGIN; nvme id-ctrl /dev/nvme0 | grep -E '^(subnqn|ioccsz|sgls|cntrltype) '; echo @@ID-END
echo @@FIO-BEGIN
rc=0
fio --name=rdma --filename=/dev/nvme0n1 --direct=1 --ioengine=io_uring --rw=randwrite \
  --bsrange=512-128k --iodepth=16 --numjobs=2 --size=16M --offset_increment=24M \
  --verify=crc32c --verify_fatal=1 --randrepeat=1 --group_reporting || rc=$?
echo; echo "fio-rc $rc"
echo @@FIO-END
# the same target over NVMe/TCP (the daemon's --tcp-listen) and over RDMA, same guest, same
# run: 4 KiB random reads, QD32, IOPS (fio terse field 8)
bench() { fio --name=b --filename=$1 --direct=1 --ioengine=io_uring --rw=randread --bs=4k \
  --iodepth=32 --size=32M --time_based --runtime=4 --output-format=terse | awk -F';' '{print $8}'; }
echo "rdma-iops $(bench /dev/nvme0n1)"
t0=$(cut -d' ' -f1 /proc/uptime)
rc=0; nvme disconnect -n $NQN || rc=$?
t1=$(cut -d' ' -f1 /proc/uptime)
echo; echo "disconnect-rc $rc"
echo "disconnect-seconds $(echo "$t0 $t1" | awk '{printf "%d", $2 - $1}')"
sleep 0.5
echo "left $(ls /sys/class/nvme | wc -l)"
nvme connect -t tcp -a 127.0.0.1 -s 4421 -n $NQN >/dev/null
for i in $(seq 1 100); do [ -b /dev/nvme0n1 ] && break; sleep 0.1; done
echo "tcp-iops $(bench /dev/nvme0n1)"
t0=$(cut -d' ' -f1 /proc/uptime)
nvme disconnect -n $NQN >/dev/null
t1=$(cut -d' ' -f1 /proc/uptime)
echo "tcp-disconnect-seconds $(echo "$t0 $t1" | awk '{printf "%d", $2 - $1}')"
# an export over NVMe/RDMA alone (no --tcp-listen): discovered, connected, written and read
echo @@RONLY-BEGIN
(RUST_LOG=info /tmp/h/vnvme serve --rdma-listen $ADDR:4430 --nqn $NQN.only --ns malloc:16M \
  > /tmp/daemon2.log 2>&1 &)
for i in $(seq 1 100); do grep -q "nvme-rdma target: listening" /tmp/daemon2.log && break; sleep 0.1; done
nvme discover -t rdma -a $ADDR -s 4430
echo @@VDISC-BEGIN
rc=0; /tmp/h/vnvme discover -t rdma $ADDR:4430 || rc=$?
echo "vdisc-rc $rc"
echo @@VDISC-END
rc=0; nvme connect -t rdma -a $ADDR -s 4430 -n $NQN.only || rc=$?
echo; echo "ronly-connect-rc $rc"
dev=$(dev_of $NQN.only)
echo "ronly-dev $dev"
dd if=/dev/urandom of=/tmp/ronly bs=65536 count=16 2>/dev/null
dd if=/tmp/ronly of=$dev bs=65536 count=16 oflag=direct 2>/dev/null
echo "ronly-match $(dd if=$dev bs=65536 count=16 iflag=direct 2>/dev/null | cmp -s - /tmp/ronly && echo yes || echo no)"
rc=0; nvme disconnect -n $NQN.only >/dev/null || rc=$?
echo "ronly-disconnect-rc $rc"
tail -5 /tmp/daemon2.log
echo "ronly-panics $(grep -ci panic /tmp/daemon2.log)"
echo @@RONLY-END
# a supervised export over NVMe/RDMA: the worker is upgraded and killed under fio verify;
# each worker listens itself, the kernel host reconnects (every second) and sends again
echo @@SUP-BEGIN
(RUST_LOG=info /tmp/h/vnvme serve --supervised --rdma-listen $ADDR:4440 --nqn $NQN.sup \
  --ns malloc:64M --rpc /tmp/sup.rpc > /tmp/sup.log 2>&1 &)
for i in $(seq 1 100); do grep -q "nvme-rdma target: listening" /tmp/sup.log && break; sleep 0.1; done
rc=0; nvme connect -t rdma -a $ADDR -s 4440 -n $NQN.sup -k 5 -c 1 -l 60 || rc=$?
echo; echo "sup-connect-rc $rc"
dev=$(dev_of $NQN.sup)
echo "sup-dev $dev"
fio --name=sup --filename=$dev --direct=1 --ioengine=io_uring --rw=randrw --bs=4k \
  --iodepth=16 --size=32M --time_based --runtime=16 --verify=crc32c --verify_fatal=1 \
  --verify_backlog=64 > /tmp/sup-fio.log 2>&1 &
fio_pid=$!
sleep 3
# an export made at run time: the call is replayed to each next worker, which listens
/tmp/h/vnvme rpc -s /tmp/sup.rpc subsystem_create rdma_listen=$ADDR:4441 nqn=$NQN.rt \
  'namespace=[{"backend":"malloc:16M"}]' > /dev/null && echo "sup-rt-created"
nvme connect -t rdma -a $ADDR -s 4441 -n $NQN.rt -k 5 -c 1 -l 60 > /dev/null
rt=$(dev_of $NQN.rt)
dd if=/dev/urandom of=/tmp/rt bs=65536 count=16 2>/dev/null
dd if=/tmp/rt of=$rt bs=65536 count=16 oflag=direct 2>/dev/null
/tmp/h/vnvme rpc -s /tmp/sup.rpc daemon_upgrade
sleep 4
w=$(/tmp/h/vnvme rpc -s /tmp/sup.rpc daemon_status | grep -o '"worker_pid": *[0-9]*' | grep -o '[0-9]*$')
echo "sup-killing $w"; kill -9 $w
rc=0; wait $fio_pid || rc=$?
echo "sup-fio-rc $rc"
echo "sup-rt-match $(dd if=$rt bs=65536 count=16 iflag=direct 2>/dev/null | cmp -s - /tmp/rt && echo yes || echo no)"
nvme disconnect -n $NQN.rt > /dev/null
grep -E "err=|READ:|WRITE:|verify" /tmp/sup-fio.log | head -8
echo "sup-status $(/tmp/h/vnvme rpc -s /tmp/sup.rpc daemon_status | tr -d ' \n')"
echo "sup-panics $(grep -ci panic /tmp/sup.log)"
grep -E "supervisor|worker|ERROR" /tmp/sup.log | tail -12
rc=0; nvme disconnect -n $NQN.sup >/dev/null || rc=$?
echo "sup-disconnect-rc $rc"
echo @@SUP-END
echo @@DMESG-BEGIN; dmesg | grep -iE 'nvme|rdma|rxe' | tail -30; echo @@DMESG-END
echo @@DAEMON-BEGIN; tail -30 /tmp/daemon.log; echo @@DAEMON-END
echo "daemon-panics $(grep -ci panic /tmp/daemon.log)"
"#;

#[test]
fn linux_kernel_rdma_host_against_the_rdma_target_on_soft_roce() {
    let tmp = TempDir::new("rdma-target");
    let bin = vnvme_binary_for_guest(tmp.path());
    let hostile = tmp.path().join("rdma_hostile_peer");
    let st = std::process::Command::new("objcopy")
        .arg("--strip-debug")
        .arg(env!("CARGO_BIN_EXE_rdma_hostile_peer"))
        .arg(&hostile)
        .status()
        .expect("objcopy");
    assert!(st.success(), "objcopy --strip-debug failed");
    let script = format!("NQN={NQN}\nADDR=10.0.2.15\n{SCRIPT}");
    // a NIC for Soft-RoCE (user networking, restricted: nothing leaves the guest)
    let guest = with_private_nic(
        harness_guest(script)
            .mem_mib(1536)
            .file(&bin)
            .file(&hostile),
    );
    let out = run_ok(&guest);
    let all = &out.console;

    let nodev = section(&out, "@@NODEV");
    assert_ne!(value(&out, "nodev-rc"), Some("0"), "{nodev}");
    assert!(
        nodev.contains("no RDMA device; load rdma_rxe"),
        "the missing-device error should say what to do:\n{nodev}"
    );
    // a hostile host on its own connections: refused or disconnected, the target serves on
    let hostile = section(&out, "@@HOSTILE");
    assert_eq!(value(&out, "hostile-rc"), Some("0"), "{hostile}");
    for (case, want) in [
        ("bad-hsqsize", "rejected 4"),
        ("short-capsule", "disconnected"),
        ("bad-key", "disconnected"),
        ("connect-status", "Some(0)"),
        ("enable-status", "Some(0)"),
        ("flood", "disconnected"),
    ] {
        assert_eq!(
            value(&out, &format!("hostile {case}")),
            Some(want),
            "{case}:\n{hostile}\n{}",
            section(&out, "@@DAEMON")
        );
    }
    let disc = section(&out, "@@DISC");
    assert_eq!(value(&out, "discover-rc"), Some("0"), "{disc}");
    assert!(
        disc.contains("trtype:  rdma")
            && disc.contains(NQN)
            && disc.contains("rdma_cms:    rdma-cm"),
        "the RDMA port is not in the discovery log:\n{disc}"
    );
    assert_eq!(value(&out, "connect-rc"), Some("0"), "{all}");
    assert_eq!(value(&out, "transport"), Some("rdma"), "{all}");
    assert_eq!(value(&out, "size"), Some("131072"), "{all}");
    let id = section(&out, "@@ID");
    assert!(id.contains(NQN) && id.contains("ioccsz    : 516"), "{id}");
    assert_eq!(
        value(&out, "fio-rc"),
        Some("0"),
        "fio verify over NVMe/RDMA:\n{}",
        section(&out, "@@FIO")
    );
    assert_eq!(value(&out, "disconnect-rc"), Some("0"), "{all}");
    let secs: u32 = value(&out, "disconnect-seconds")
        .and_then(|v| v.parse().ok())
        .unwrap_or(u32::MAX);
    assert!(
        secs < 10,
        "disconnect took {secs} s (a command timed out):\n{}",
        section(&out, "@@DMESG")
    );
    let tcp_secs: u32 = value(&out, "tcp-disconnect-seconds")
        .and_then(|v| v.parse().ok())
        .unwrap_or(u32::MAX);
    assert!(
        tcp_secs < 10,
        "NVMe/TCP disconnect took {tcp_secs} s (a command timed out):\n{}",
        section(&out, "@@DMESG")
    );
    assert_eq!(
        value(&out, "left"),
        Some("0"),
        "controller still present:\n{all}"
    );
    let iops = |k: &str| value(&out, k).and_then(|v| v.parse::<f64>().ok());
    let (rdma, tcp) = (iops("rdma-iops"), iops("tcp-iops"));
    assert!(
        rdma.is_some_and(|r| r > 0.0) && tcp.is_some_and(|t| t > 0.0),
        "benchmark: rdma {rdma:?} tcp {tcp:?}:\n{all}"
    );
    let (rdma, tcp) = (rdma.unwrap_or(0.0), tcp.unwrap_or(1.0));
    eprintln!(
        "vnvme target, Linux host, fio 4 KiB randread QD32: NVMe/RDMA (Soft-RoCE) {rdma:.0} IOPS, NVMe/TCP (loopback) {tcp:.0} IOPS, ratio {:.2}",
        rdma / tcp
    );
    assert_eq!(
        value(&out, "daemon-panics"),
        Some("0"),
        "{}",
        section(&out, "@@DAEMON")
    );
    // the RDMA-only export
    let ronly = section(&out, "@@RONLY");
    assert!(
        ronly.contains("trtype:  rdma") && ronly.contains(&format!("{NQN}.only")),
        "the RDMA-only export is not in its discovery log:\n{ronly}"
    );
    // vnvme's own discover over RDMA
    let vdisc = section(&out, "@@VDISC");
    assert_eq!(value(&out, "vdisc-rc"), Some("0"), "{vdisc}");
    assert!(
        vdisc.contains("trtype:  rdma") && vdisc.contains(&format!("{NQN}.only")),
        "vnvme discover -t rdma:\n{vdisc}"
    );
    assert_eq!(value(&out, "ronly-connect-rc"), Some("0"), "{ronly}");
    assert_eq!(value(&out, "ronly-match"), Some("yes"), "{ronly}");
    assert_eq!(value(&out, "ronly-disconnect-rc"), Some("0"), "{ronly}");
    assert_eq!(value(&out, "ronly-panics"), Some("0"), "{ronly}");
    // the supervised export: fio verify through an upgrade and a kill of the worker
    let sup = section(&out, "@@SUP");
    assert_eq!(value(&out, "sup-connect-rc"), Some("0"), "{sup}");
    assert_eq!(
        value(&out, "sup-fio-rc"),
        Some("0"),
        "fio verify over a supervised NVMe/RDMA export:\n{sup}\n{}",
        section(&out, "@@DMESG")
    );
    let status = value(&out, "sup-status").unwrap_or_default();
    assert!(
        status.contains("\"upgrades\":1") && status.contains("\"recoveries\":1"),
        "{sup}"
    );
    assert_eq!(value(&out, "sup-panics"), Some("0"), "{sup}");
    // the export made at run time: back in each next worker, its data read back after both
    assert!(sup.contains("sup-rt-created"), "{sup}");
    assert_eq!(value(&out, "sup-rt-match"), Some("yes"), "{sup}");
    eprintln!("supervised NVMe/RDMA export:\n{sup}");
}
