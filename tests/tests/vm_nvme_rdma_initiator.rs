//! vnvme's NVMe/RDMA initiator against the Linux kernel's nvmet-rdma target, on Soft-RoCE in
//! one guest (this machine has no RDMA device; the guest kernel has `rdma_rxe`).
//!
//! The whole chain runs in the guest (no nested guest): nvmet-rdma exports a file; vnvme's
//! daemon serves a vfio-user controller whose namespace is `nvme-rdma://` that export; and
//! `vnvme perf` is that controller's vfio-user client (the role a VM's driver has):
//! - `perf --verify` through the chain passes, its data moved by the target straight to and
//!   from the client's buffers (memory windows over the registered guest memory);
//! - the target's port removed and re-added during `perf --verify`: the initiator
//!   reconnects and resends, perf sees no failed command and no corruption;
//! - with `no_remote_invalidate` the host revokes each command's window itself (the
//!   target is not asked to): `perf --verify` passes and windows were revoked;
//! - `perf` on the initiator alone, over RDMA and over NVMe/TCP to the same kernel target in
//!   the same run (a port of each): the figures for BENCHMARKS.md.

use vnvme_tests::guest::{
    TempDir, harness_guest, run_ok, section, value, vnvme_binary_for_guest, with_private_nic,
};

const SCRIPT: &str = r#"
net_up
modprobe crc32_generic; modprobe rdma_rxe; modprobe ib_uverbs; modprobe rdma_ucm
modprobe nvmet; modprobe nvmet_rdma; modprobe nvmet_tcp
rdma link add rxe0 type rxe netdev eth0
S=nqn.2014-08.org.vnvme:kernel-rdma
truncate -s 256M /tmp/disk.img
cd /sys/kernel/config/nvmet
mkdir subsystems/$S; echo 1 > subsystems/$S/attr_allow_any_host
mkdir subsystems/$S/namespaces/1
echo -n /tmp/disk.img > subsystems/$S/namespaces/1/device_path
echo 1 > subsystems/$S/namespaces/1/buffered_io; echo 1 > subsystems/$S/namespaces/1/enable
port_up() {
  mkdir /sys/kernel/config/nvmet/ports/1; cd /sys/kernel/config/nvmet/ports/1
  echo rdma > addr_trtype; echo ipv4 > addr_adrfam; echo 10.0.2.15 > addr_traddr; echo 4420 > addr_trsvcid
  ln -s /sys/kernel/config/nvmet/subsystems/$S subsystems/$S; cd /tmp/h
}
port_down() { rm /sys/kernel/config/nvmet/ports/1/subsystems/$S; rmdir /sys/kernel/config/nvmet/ports/1; }
port_up
P2=/sys/kernel/config/nvmet/ports/2
mkdir $P2; echo tcp > $P2/addr_trtype; echo ipv4 > $P2/addr_adrfam
echo 127.0.0.1 > $P2/addr_traddr; echo 4421 > $P2/addr_trsvcid
ln -s /sys/kernel/config/nvmet/subsystems/$S $P2/subsystems/$S
URL="nvme-rdma://10.0.2.15:4420/$S/1"
(RUST_LOG=info /tmp/h/vnvme serve --socket /tmp/a.sock \
  --ns "$URL?reconnect_delay=1&ctrl_loss_tmo=60&nr_io_queues=2" > /tmp/daemon.log 2>&1 &)
for i in $(seq 1 300); do [ -S /tmp/a.sock ] && break; sleep 0.1; done
perf() { RUST_LOG=warn /tmp/h/vnvme perf vfio-user:/tmp/a.sock -q 32 -o 8192 -w randrw -M 50 -t $1 --verify --dma-mib 32 2>&1; }
echo @@PERF1-BEGIN; rc=0; perf 3 || rc=$?; echo "perf1-rc $rc"; echo @@PERF1-END
(sleep 4; port_down; echo "port removed"; sleep 3; port_up; echo "port re-added") &
echo @@PERF2-BEGIN; rc=0; perf 14 || rc=$?; echo "perf2-rc $rc"; echo @@PERF2-END
wait
echo "reconnects $(grep -c 'reconnected' /tmp/daemon.log)"
# the daemon's queues report at their end how their data moved
kill -INT $(pidof vnvme); for i in $(seq 1 100); do pidof vnvme >/dev/null || break; sleep 0.1; done
echo @@MOVED-BEGIN; grep 'bytes moved straight' /tmp/daemon.log; echo @@MOVED-END
# the host revokes each window itself: the target is not asked to invalidate it
(RUST_LOG=info /tmp/h/vnvme serve --socket /tmp/a.sock --ns "$URL?no_remote_invalidate" \
  > /tmp/own.log 2>&1 &)
for i in $(seq 1 300); do [ -S /tmp/a.sock ] && break; sleep 0.1; done
echo @@OWNINV-BEGIN; rc=0; perf 3 || rc=$?; echo "owninv-rc $rc"
kill -INT $(pidof vnvme); for i in $(seq 1 100); do pidof vnvme >/dev/null || break; sleep 0.1; done
grep 'bytes moved straight' /tmp/own.log; echo @@OWNINV-END
echo @@BENCH-BEGIN
bench() { RUST_LOG=warn /tmp/h/vnvme perf "$1" -q 32 -o 4096 -w randread -t 5 2>&1 | grep -m1 Total; }
echo "rdma $(bench "$URL")"
echo "tcp $(bench "nvme-tcp://127.0.0.1:4421/$S/1")"
echo @@BENCH-END
echo @@DAEMON-BEGIN; tail -40 /tmp/daemon.log; echo @@DAEMON-END
echo "daemon-panics $(grep -ci panic /tmp/daemon.log)"
echo @@DMESG-BEGIN; dmesg | grep -iE 'nvmet|rdma|rxe' | tail -30; echo @@DMESG-END
"#;

/// The IOPS column of a perf "Total" line.
fn iops(line: &str) -> f64 {
    line.split(':')
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn rdma_initiator_against_linux_nvmet_rdma_on_soft_roce() {
    let tmp = TempDir::new("rdma-init");
    let bin = vnvme_binary_for_guest(tmp.path());
    let guest = with_private_nic(harness_guest(SCRIPT).mem_mib(1536).file(&bin));
    let out = run_ok(&guest);
    let daemon = section(&out, "@@DAEMON");
    let p1 = section(&out, "@@PERF1");
    assert_eq!(value(&out, "perf1-rc"), Some("0"), "{p1}\n{daemon}");
    assert!(p1.contains("Total"), "{p1}");
    let p2 = section(&out, "@@PERF2");
    assert_eq!(
        value(&out, "perf2-rc"),
        Some("0"),
        "perf --verify across the port's removal: {p2}\n{daemon}\n{}",
        section(&out, "@@DMESG")
    );
    assert!(
        out.console.contains("port removed") && out.console.contains("port re-added"),
        "{}",
        out.console
    );
    assert_ne!(
        value(&out, "reconnects"),
        Some("0"),
        "the initiator never reconnected:\n{daemon}"
    );
    assert_eq!(value(&out, "daemon-panics"), Some("0"), "{daemon}");
    // zero copy: the target reached the guest's (here perf's) buffers through windows
    let moved = section(&out, "@@MOVED");
    let direct: u64 = moved
        .lines()
        .filter_map(|l| l.split(": ").nth(1)?.split(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(
        direct > 0,
        "no data moved through memory windows:\n{moved}\n{daemon}"
    );
    // the same, revoking each window ourselves (no Invalidate Key asked of the target)
    let own = section(&out, "@@OWNINV");
    assert_eq!(value(&out, "owninv-rc"), Some("0"), "{own}");
    // windows revoked by the host, per the queues' closing lines
    let revoked_in = |lines: &str| -> u64 {
        lines
            .lines()
            .filter_map(|l| l.split("; ").nth(1)?.split(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    // with Invalidate Key asked, nvmet honoured every one: the host revoked nothing itself
    assert_eq!(revoked_in(moved), 0, "{moved}");
    let revoked = revoked_in(own);
    assert!(
        revoked > 0 && own.contains("bytes moved straight"),
        "no window revoked by the host:\n{own}"
    );
    eprintln!("no_remote_invalidate: {revoked} windows revoked by the host, perf --verify clean");
    let bench = section(&out, "@@BENCH");
    let rdma = value(&out, "rdma").map_or(0.0, iops);
    let tcp = value(&out, "tcp").map_or(0.0, iops);
    assert!(rdma > 0.0 && tcp > 0.0, "{bench}");
    eprintln!(
        "nvme-rdma initiator {rdma:.0} IOPS, nvme-tcp initiator {tcp:.0} IOPS (4 KiB randread QD32, Soft-RoCE vs TCP loopback, same guest): ratio {:.2}",
        rdma / tcp
    );
}
