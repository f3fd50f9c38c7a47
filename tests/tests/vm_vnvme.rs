//! vnvme in place of QEMU's nvme: a real Linux guest with its stock nvme driver, nvme-cli and
//! fio against controllers served by the daemon over vfio-user. Mirrors `vm_qemu_nvme.rs`.
//!
//! One boot covers: two controllers (two sockets) in one guest, two namespaces on one
//! controller, nvme-cli admin commands (id-ctrl, id-ns, smart-log, error-log, fw-log,
//! get-feature 1..0xb, reset, format), a command for an absent namespace, and fio write+verify
//! (crc32c, randwrite, 4 jobs, QD 32, bs 512..128k) on a file namespace. Then the daemon
//! is stopped and started again and a second boot re-verifies the data (persistence).

use std::path::Path;

use device_model::ControllerStats;
use vnvme::config::Config;
use vnvme::daemon::Daemon;
use vnvme_tests::guest::{harness_guest, run_ok, section, value};

/// Finds controllers A and B by serial, waits for their namespaces.
const FIND: &str = r#"
for i in $(seq 1 100); do [ -b /dev/nvme0n1 ] && [ -b /dev/nvme1n1 ] && break; sleep 0.1; done
for c in /sys/class/nvme/nvme*; do
  s=$(tr -d ' ' < $c/serial)
  [ "$s" = VNVMEA ] && A=/dev/$(basename $c)
  [ "$s" = VNVMEB ] && B=/dev/$(basename $c)
done
# block devices are named in scan order, not by NSID: tell them apart by size (512 B sectors)
for i in $(seq 1 100); do [ $(ls /sys/block | grep -c nvme) -ge 3 ] && break; sleep 0.1; done
for d in /sys/block/nvme*; do
  case $(cat $d/size) in 524288) FA=/dev/$(basename $d) ;; 131072) MA=/dev/$(basename $d) ;; 2097152) NB=/dev/$(basename $d) ;; esac
done
echo "ctrl-a $A $FA $MA"; echo "ctrl-b $B $NB"
"#;

/// fio job on controller A's file namespace: 4 jobs in disjoint 48 MiB stripes.
const FIO: &str = "fio --name=verify --filename=$FA --direct=1 --ioengine=io_uring --rw=randwrite \
 --bsrange=512-128k --numjobs=4 --iodepth=32 --size=32M --offset_increment=48M --verify=crc32c \
 --verify_fatal=1 --randrepeat=1 --group_reporting";

fn config(dir: &Path) -> Config {
    let text = format!(
        "[[controller]]\nsocket = \"{d}/a.sock\"\nserial = \"VNVMEA\"\n\
         [[controller.namespace]]\nbackend = \"file:{d}/ns1.img:256M\"\n\
         [[controller.namespace]]\nbackend = \"malloc:64M\"\n\
         [[controller]]\nsocket = \"{d}/b.sock\"\nserial = \"VNVMEB\"\n\
         [[controller.namespace]]\nbackend = \"null:1G\"\nblock_size = 4096\n",
        d = dir.display()
    );
    Config::parse(&text, Path::new("vm_vnvme.toml")).expect("test config")
}

fn first_number(s: &str) -> u64 {
    s.split(|c: char| !c.is_ascii_digit())
        .find(|t| !t.is_empty())
        .and_then(|t| t.parse().ok())
        .unwrap_or(0)
}

#[test]
fn stock_linux_driver_nvme_cli_and_fio_against_vnvme_then_data_survives_restart() {
    let dir = std::env::temp_dir().join(format!("vnvme-vm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = config(&dir);

    let daemon = Daemon::start(&cfg).expect("daemon starts");
    let script = format!(
        r#"{FIND}
echo @@LIST-BEGIN; nvme list; echo @@LIST-END
echo @@IDCTRL-BEGIN; nvme id-ctrl $A; echo @@IDCTRL-END
echo @@IDNS-BEGIN; nvme id-ns $A -n 1; echo @@IDNS-END
echo "writes-before $(nvme smart-log $A | grep -i host_write_commands)"
echo @@FEATURES-BEGIN
for f in 1 2 3 4 5 6 7 8 9 10 11; do
  if nvme get-feature $A -f $f -n 1 >/dev/null 2>&1; then echo "feature $f ok"; else echo "feature $f FAIL"; fi
done
echo @@FEATURES-END
echo @@LOGS-BEGIN; nvme error-log $A -e 4 && echo error-log-ok; nvme fw-log $A && echo fw-log-ok; echo @@LOGS-END
echo @@FIO-BEGIN; {FIO}; echo "fio-rc $?"; echo @@FIO-END
echo "writes-after $(nvme smart-log $A | grep -i host_write_commands)"
if nvme admin-passthru $A --opcode=6 --namespace-id=9 --data-len=4096 --read --cdw10=0 >/tmp/o 2>&1; then echo "bad-nsid accepted"; else echo "bad-nsid rejected: $(cat /tmp/o | tr '\n' ' ')"; fi
dd if=/dev/urandom of=/tmp/pat bs=4096 count=4 2>/dev/null
dd if=/tmp/pat of=$MA bs=4096 count=4 oflag=direct 2>/dev/null
nvme format $A -n 2 --lbaf=0 --ses=1 --force && echo format-ok
dd if=$MA bs=4096 count=4 iflag=direct 2>/dev/null | od -An -v -tx1 | tr -d ' \n' | grep -q '[1-9a-f]' && echo "after-format nonzero" || echo "after-format zero"
nvme reset $A && echo reset-ok
for i in $(seq 1 100); do [ -b $FA ] && break; sleep 0.1; done
dd if=$FA of=/dev/null bs=4096 count=16 iflag=direct 2>/dev/null && echo read-after-reset-ok
dd if=$NB of=/dev/null bs=1M count=8 iflag=direct 2>/dev/null && echo ctrl-b-read-ok
"#
    );
    let guest = harness_guest(script)
        .vfio_user(dir.join("a.sock"))
        .vfio_user(dir.join("b.sock"));
    let out = run_ok(&guest);
    // the device offers QEMU the error and request eventfds a PCIe function has
    assert!(
        !out.console.contains("Could not enable error recovery"),
        "QEMU warned about error recovery:\n{}",
        out.console
    );
    let stats = daemon.stats(0).expect("controller A");
    let dbbuf = ControllerStats::get(&stats.shadow_doorbell_configs);
    let enables = ControllerStats::get(&stats.enables);
    daemon.stop().expect("daemon stops cleanly");
    // Linux 6.12 sends Doorbell Buffer Config after every enable when OACS bit 8 is set, so
    // all the I/O above went through shadow doorbells (the firmware's enable does not).
    assert!(
        dbbuf >= 2 && dbbuf + 1 >= enables,
        "shadow doorbells configured {dbbuf} times for {enables} enables (probe + nvme reset)"
    );

    let list = section(&out, "@@LIST");
    assert!(
        list.contains("VNVMEA") && list.contains("VNVMEB"),
        "nvme list lacks a controller:\n{list}"
    );
    assert_eq!(
        list.matches("vnvme emulated NVMe controller").count(),
        3,
        "expected 3 namespaces:\n{list}"
    );
    let idctrl = section(&out, "@@IDCTRL");
    assert!(
        idctrl.contains("sn        : VNVMEA") && idctrl.contains("mdts      : 7"),
        "{idctrl}"
    );
    let idns = section(&out, "@@IDNS");
    assert!(
        idns.contains("nsze    : 0x80000"),
        "256 MiB of 512-byte blocks:\n{idns}"
    );
    let features = section(&out, "@@FEATURES");
    assert!(
        !features.contains("FAIL") && features.matches(" ok").count() == 11,
        "{features}"
    );
    let logs = section(&out, "@@LOGS");
    assert!(
        logs.contains("error-log-ok") && logs.contains("fw-log-ok"),
        "{logs}"
    );
    let fio = section(&out, "@@FIO");
    assert!(
        fio.contains("fio-rc 0") && fio.contains("err= 0") && !fio.contains("verify: bad"),
        "{fio}"
    );
    let before = first_number(
        value(&out, "writes-before")
            .unwrap_or_default()
            .rsplit(':')
            .next()
            .unwrap_or_default(),
    );
    let after = first_number(
        value(&out, "writes-after")
            .unwrap_or_default()
            .rsplit(':')
            .next()
            .unwrap_or_default(),
    );
    assert!(
        after > before + 100,
        "SMART host write commands did not move: {before} -> {after}"
    );
    let bad = value(&out, "bad-nsid").unwrap_or_default();
    assert!(
        bad.starts_with("rejected") && bad.contains("(0x400b)"),
        "Identify of absent NSID 9: {bad}"
    );
    for marker in [
        "format-ok",
        "after-format zero",
        "reset-ok",
        "read-after-reset-ok",
        "ctrl-b-read-ok",
    ] {
        assert!(
            out.console.contains(marker),
            "missing {marker} in console:\n{}",
            out.console
        );
    }

    // Restart the daemon on the same file, boot again, verify what the first boot wrote.
    let daemon = Daemon::start(&cfg).expect("daemon restarts");
    let script = format!(
        "{FIND}\necho @@REVERIFY-BEGIN; {FIO} --verify_only; echo \"fio-rc $?\"; echo @@REVERIFY-END\n"
    );
    let out = run_ok(
        &harness_guest(script)
            .vfio_user(dir.join("a.sock"))
            .vfio_user(dir.join("b.sock")),
    );
    daemon.stop().expect("daemon stops cleanly");
    let re = section(&out, "@@REVERIFY");
    assert!(
        re.contains("fio-rc 0") && re.contains("err= 0"),
        "data did not survive the restart:\n{re}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
