//! The NVMe/TCP initiator against the real Linux kernel target: guest B exports a QEMU NVMe
//! disk through nvmet-tcp (configfs), reached from the host through a forwarded port.
//!
//! One run of guest B covers, in order:
//! - discovery: the Discovery log lists the subsystem;
//! - `vnvme serve` with an `nvme-tcp://` namespace (header and data digests on): a
//!   host-side client's `perf --verify` passes through it;
//! - a target restart (port removed and re-created) during `perf --verify`: the backend
//!   reconnects and resends, perf sees no error and no corruption;
//! - end to end: guest A attaches the vfio-user controller whose namespace is that remote
//!   namespace and runs fio write+verify with the stock nvme driver;
//! - the target gone for good: I/O fails with an error after `ctrl_loss_tmo`, no hang.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use host_driver::NvmeDriver;
use host_driver::transport::vfio_user::VfioUserTransport;
use vnvme::config::Config;
use vnvme::daemon::Daemon;
use vnvme::perf::{Pattern, PerfOptions};
use vnvme_tests::guest::{TempDir, harness_guest, run_ok, section, value};

const NQN: &str = "nqn.2014-08.org.vnvme:kernel-target";
const TCP_PORT: u16 = 14420;
const CTL_PORT: u16 = 15000;

/// Guest B: nvmet-tcp on the QEMU NVMe disk; then commands from the host on port 5000.
const TARGET_SCRIPT: &str = r#"
net_up
modprobe nvmet; modprobe nvmet_tcp
S=nqn.2014-08.org.vnvme:kernel-target
D=$(ls /dev/nvme*n1 | head -1)
cd /sys/kernel/config/nvmet
mkdir subsystems/$S; echo 1 > subsystems/$S/attr_allow_any_host
mkdir subsystems/$S/namespaces/1
echo -n $D > subsystems/$S/namespaces/1/device_path; echo 1 > subsystems/$S/namespaces/1/enable
cat > /tmp/port_up.sh <<EOT
cd /sys/kernel/config/nvmet
mkdir ports/1; echo tcp > ports/1/addr_trtype; echo ipv4 > ports/1/addr_adrfam
echo 0.0.0.0 > ports/1/addr_traddr; echo 4420 > ports/1/addr_trsvcid
ln -s /sys/kernel/config/nvmet/subsystems/$S ports/1/subsystems/$S
EOT
cat > /tmp/port_down.sh <<EOT
cd /sys/kernel/config/nvmet
rm ports/1/subsystems/$S; rmdir ports/1
EOT
cat > /tmp/ctl.sh <<'EOT'
read -r cmd
case "$cmd" in
  restart) sh /tmp/port_down.sh; sleep 3; sh /tmp/port_up.sh; echo restarted ;;
  stop) sh /tmp/port_down.sh; echo stopped ;;
  quit) touch /tmp/quit; echo bye ;;
  *) echo "unknown command" ;;
esac
EOT
sh /tmp/port_up.sh
echo; echo "target-ready 1"
while [ ! -e /tmp/quit ]; do nc -l -p 5000 -e sh /tmp/ctl.sh; done
echo @@DMESG-BEGIN; dmesg | grep -E 'nvmet' ; echo @@DMESG-END
"#;

/// Guest A: the stock nvme driver on vnvme's controller, fio write+verify.
const FIO_SCRIPT: &str = r#"
for i in $(seq 1 100); do [ -b /dev/nvme0n1 ] && break; sleep 0.1; done
echo; echo "size $(cat /sys/block/nvme0n1/size)"
echo @@FIO-BEGIN
rc=0
fio --name=tcp --filename=/dev/nvme0n1 --direct=1 --ioengine=io_uring --rw=randwrite \
  --bsrange=4k-128k --iodepth=16 --size=24M --verify=crc32c --verify_fatal=1 --randrepeat=1 || rc=$?
echo; echo "fio-rc $rc"
echo @@FIO-END
"#;

/// Send one command to guest B's control port; returns its answer.
fn control(cmd: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", CTL_PORT)).expect("control port");
    s.set_read_timeout(Some(Duration::from_mins(1))).unwrap();
    writeln!(s, "{cmd}").unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer.trim().to_string()
}

fn serve(dir: &Path, tag: &str, options: &str) -> Daemon {
    let cfg = Config::parse(
        &format!(
            "[[controller]]\nsocket = \"{d}/{tag}.sock\"\nserial = \"TCP{tag}\"\n\
             [[controller.namespace]]\nbackend = \"nvme-tcp://127.0.0.1:{TCP_PORT}/{NQN}/1?{options}\"\n",
            d = dir.display()
        ),
        Path::new("tcp.toml"),
    )
    .unwrap();
    Daemon::start(&cfg).expect("the daemon connects to the kernel target")
}

fn perf(sock: &Path, secs: f64, pattern: Pattern, verify: bool) -> vnvme::perf::Report {
    let t = VfioUserTransport::connect(sock).expect("connect");
    let mut c = NvmeDriver::new(Box::new(t), 32 << 20, 2).expect("bring-up");
    let opts = PerfOptions {
        queue_depth: 32,
        io_size: 8192,
        pattern,
        read_percent: 50,
        duration: Duration::from_secs_f64(secs),
        workers: 1,
        verify,
        shadow_doorbells: false,
    };
    vnvme::perf::run(&mut c, &opts, |_, _| {}).expect("perf runs")
}

#[test]
fn initiator_against_the_linux_kernel_target() {
    let tmp = TempDir::new("tcp-init");
    let d = tmp.path().to_path_buf();
    let img = d.join("disk.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    let (ready_tx, ready_rx) = mpsc::channel();
    let ready_tx = std::sync::Mutex::new(ready_tx);
    let target = harness_guest(TARGET_SCRIPT)
        .qemu_nvme(&img, "")
        .hostfwd(TCP_PORT, 4420)
        .hostfwd(CTL_PORT, 5000)
        .on_console_line(move |l| {
            if l.contains("target-ready") {
                let _ = ready_tx.lock().unwrap().send(());
            }
        });
    let target = std::thread::spawn(move || run_ok(&target));
    ready_rx
        .recv_timeout(Duration::from_mins(3))
        .expect("guest B's target came up");

    // discovery
    let records =
        nvmeof::initiator::discover(&format!("127.0.0.1:{TCP_PORT}"), Duration::from_secs(10))
            .expect("discovery");
    assert!(
        records
            .iter()
            .any(|r| r.subnqn == NQN && r.transport() == "tcp" && r.kind() == "nvme subsystem"),
        "{records:?}"
    );

    // I/O through the remote namespace, digests on, then across a target restart
    let daemon = serve(
        &d,
        "a",
        "hdgst&ddgst&reconnect_delay=1&ctrl_loss_tmo=60&nr_io_queues=2",
    );
    let sock = d.join("a.sock");
    let r = perf(&sock, 3.0, Pattern::Randrw, true).total();
    assert!(
        r.ios > 50 && r.errors == 0 && r.verify_failures == 0,
        "{r:?}"
    );
    let restart = std::thread::spawn(|| {
        std::thread::sleep(Duration::from_secs(4));
        control("restart")
    });
    let r = perf(&sock, 14.0, Pattern::Randrw, true).total();
    assert_eq!(restart.join().unwrap(), "restarted");
    assert!(
        r.errors == 0 && r.verify_failures == 0,
        "I/O across the target restart: {r:?}"
    );

    // end to end: a Linux guest on the vfio-user controller backed by the remote namespace
    let out = run_ok(&harness_guest(FIO_SCRIPT).vfio_user(&sock));
    assert_eq!(value(&out, "size"), Some("524288"), "{}", out.console);
    assert_eq!(
        value(&out, "fio-rc"),
        Some("0"),
        "fio verify in guest A:\n{}",
        section(&out, "@@FIO")
    );
    daemon.stop().unwrap();

    // the target gone for good: errors after the controller loss timeout, not a hang
    let daemon = serve(&d, "b", "reconnect_delay=1&ctrl_loss_tmo=3&kato=2");
    assert_eq!(control("stop"), "stopped");
    let t = Instant::now();
    let r = perf(&d.join("b.sock"), 1.0, Pattern::Randread, false).total();
    assert!(r.errors > 0, "no errors with the target gone: {r:?}");
    assert!(
        t.elapsed() < Duration::from_secs(25),
        "errors took {:?}",
        t.elapsed()
    );
    daemon.stop().unwrap();

    assert_eq!(control("quit"), "bye");
    let out = target.join().expect("guest B");
    let dmesg = section(&out, "@@DMESG");
    // the kernel saw the first association, and a new one after the restart
    assert!(
        dmesg.matches("creating nvm controller").count() >= 3,
        "{dmesg}"
    );
}
