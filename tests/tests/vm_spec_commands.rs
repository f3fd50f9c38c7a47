//! NVMe 2.x features and optional commands a stock OS and nvme-cli use (issue 16, items 12
//! and 14), from a real Linux guest with nvme-cli against vnvme over vfio-user, in one boot:
//! Identify's ONCS/OACS bits, Interrupt Vector Configuration and Interrupt Coalescing set and
//! read back, APST (0Ch) refused with Invalid Field, Write Uncorrectable then a failing read
//! (passthrough and block layer), Verify, Get LBA Status and the LBA Status Information log,
//! and Write Zeroes making the blocks readable again.

use vnvme::config::Config;
use vnvme::daemon::Daemon;
use vnvme_tests::guest::{harness_guest, run_ok, section};

// Long options throughout: nvme-cli 2.x took `-v` for --verbose, so `set-feature -v 1` sets
// the value 0 (IV 0, the admin vector: Invalid Field); `--value` is what the feature gets.
const SCRIPT: &str = r#"
for i in $(seq 1 100); do [ -b /dev/nvme0n1 ] && break; sleep 0.1; done
C=/dev/nvme0; N=/dev/nvme0n1
run() { name=$1; shift; echo "@@$name-BEGIN"; rc=0; "$@" 2>&1 || rc=$?; echo "rc=$rc"; echo "@@$name-END"; }
nvme version
run IDCTRL nvme id-ctrl $C
run SETF9 nvme set-feature $C --feature-id=9 --value=0x10001
run GETF9 nvme get-feature $C --feature-id=9 --cdw11=1
run SETF9ADMIN nvme set-feature $C --feature-id=9 --value=0x10000
run SETF8 nvme set-feature $C --feature-id=8 --value=0x0a03
run GETF8 nvme get-feature $C --feature-id=8
run GETFC nvme get-feature $C --feature-id=0xc
dd if=/dev/urandom of=/tmp/pat bs=4096 count=2 2>/dev/null
dd if=/tmp/pat of=$N bs=4096 count=2 oflag=direct 2>/dev/null
run WUNC nvme write-uncor $N --namespace-id=1 --start-block=8 --block-count=7
run READBAD nvme read $N --namespace-id=1 --start-block=8 --block-count=0 --data-size=512 --data=/tmp/r
run DDBAD dd if=$N of=/dev/null bs=512 skip=8 count=1 iflag=direct
run VERIFYBAD nvme verify $N --namespace-id=1 --start-block=8 --block-count=7
run VERIFYOK nvme verify $N --namespace-id=1 --start-block=0 --block-count=7
run LBAST nvme get-lba-status $C --namespace-id=1 --start-lba=0 --max-dw=1023 --action=0x11
run LBALOG nvme lba-status-log $C
run WZ nvme write-zeroes $N --namespace-id=1 --start-block=8 --block-count=7
run READOK nvme read $N --namespace-id=1 --start-block=8 --block-count=7 --data-size=4096 --data=/tmp/r
run ZEROES sh -c 'od -An -v -tx1 /tmp/r | tr -d " \n" | grep -q "[1-9a-f]" && echo nonzero || echo allzero'
run KEPT sh -c 'dd if=$0 bs=4096 count=1 iflag=direct 2>/dev/null | cmp - /tmp/pat -n 4096 && echo same' $N
run VERIFYALL nvme verify $N --namespace-id=1 --start-block=0 --block-count=15
run LBAST2 nvme get-lba-status $C --namespace-id=1 --start-lba=0 --max-dw=1023 --action=0x11
"#;

/// The value of `field : value` in nvme id-ctrl output.
fn id_field(idctrl: &str, field: &str) -> u64 {
    let line = idctrl
        .lines()
        .find(|l| l.split(':').next().is_some_and(|k| k.trim() == field))
        .unwrap_or_else(|| panic!("no {field} in id-ctrl:\n{idctrl}"));
    let v = line.split(':').nth(1).unwrap_or_default().trim();
    u64::from_str_radix(v.trim_start_matches("0x"), 16).unwrap_or_else(|_| panic!("{field}: {v}"))
}

/// The (DSLBA, NLB) of nvme get-lba-status output lines `{ DSLBA: 0x.., NLB: 0x.., ... }`.
fn descriptors(s: &str) -> Vec<(u64, u64)> {
    let hex = |l: &str, key: &str| {
        let v = l.split(key).nth(1)?.split(',').next()?.trim();
        u64::from_str_radix(v.trim_start_matches("0x"), 16).ok()
    };
    s.lines()
        .filter_map(|l| Some((hex(l, "DSLBA:")?, hex(l, "NLB:")?)))
        .collect()
}

fn ok(s: &str) -> bool {
    s.contains("rc=0")
}

#[test]
fn nvme_cli_features_write_uncorrectable_verify_and_lba_status_in_a_guest() {
    let dir = std::env::temp_dir().join(format!("vnvme-vm-spec-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("c.sock");
    let cfg = Config::from_flags(
        vnvme::config::Served::socket(sock.clone()),
        &["malloc:64M".into()],
        Some("SPECVM".into()),
        512,
        vnvme::config::PollSetting::Adaptive,
    )
    .unwrap();
    let daemon = Daemon::start(&cfg).expect("daemon starts");
    let out = run_ok(&harness_guest(SCRIPT).vfio_user(sock));
    daemon.stop().expect("daemon stops cleanly");

    let idctrl = section(&out, "@@IDCTRL");
    let (oacs, oncs) = (id_field(idctrl, "oacs"), id_field(idctrl, "oncs"));
    assert!(oacs & (1 << 9) != 0, "OACS Get LBA Status: {oacs:#x}");
    assert!(oncs & (1 << 1) != 0, "ONCS Write Uncorrectable: {oncs:#x}");
    assert!(oncs & (1 << 7) != 0, "ONCS Verify: {oncs:#x}");
    assert_eq!(id_field(idctrl, "apsta"), 0);

    let s = section(&out, "@@SETF9");
    assert!(ok(s), "set-feature 9 IV 1:\n{s}");
    let s = section(&out, "@@GETF9");
    assert!(
        ok(s) && s.contains("0x00010001"),
        "get-feature 9 IV 1:\n{s}"
    );
    let s = section(&out, "@@SETF9ADMIN");
    assert!(
        !ok(s) && s.contains("0x4002"),
        "IV 0 is Invalid Field:\n{s}"
    );
    let s = section(&out, "@@SETF8");
    assert!(ok(s), "set-feature 8:\n{s}");
    let s = section(&out, "@@GETF8");
    assert!(ok(s) && s.contains("0x00000a03"), "get-feature 8:\n{s}");
    let s = section(&out, "@@GETFC");
    assert!(
        !ok(s) && s.contains("0x4002"),
        "APST is Invalid Field:\n{s}"
    );

    let s = section(&out, "@@WUNC");
    assert!(ok(s), "write-uncor:\n{s}");
    let s = section(&out, "@@READBAD");
    assert!(
        !ok(s) && s.contains("0x281"),
        "read of uncorrectable blocks:\n{s}"
    );
    let s = section(&out, "@@DDBAD");
    assert!(!ok(s), "block layer read of an uncorrectable block:\n{s}");
    let s = section(&out, "@@VERIFYBAD");
    assert!(
        !ok(s) && s.contains("0x281"),
        "verify of uncorrectable blocks:\n{s}"
    );
    let s = section(&out, "@@VERIFYOK");
    assert!(ok(s), "verify of good blocks:\n{s}");
    let s = section(&out, "@@LBAST");
    assert!(ok(s), "get-lba-status:\n{s}");
    assert_eq!(
        descriptors(s),
        [(8, 8)],
        "get-lba-status lists LBAs 8-15:\n{s}"
    );
    let s = section(&out, "@@LBALOG");
    assert!(ok(s), "lba-status-log:\n{s}");
    let s = section(&out, "@@WZ");
    assert!(ok(s), "write-zeroes:\n{s}");
    let s = section(&out, "@@READOK");
    assert!(ok(s), "read after write-zeroes:\n{s}");
    let s = section(&out, "@@ZEROES");
    assert!(s.contains("allzero"), "write-zeroes data:\n{s}");
    let s = section(&out, "@@KEPT");
    assert!(s.contains("same"), "blocks 0-7 kept their data:\n{s}");
    let s = section(&out, "@@VERIFYALL");
    assert!(ok(s), "verify after write-zeroes:\n{s}");
    let s = section(&out, "@@LBAST2");
    assert!(ok(s), "get-lba-status after write-zeroes:\n{s}");
    assert_eq!(descriptors(s), [], "nothing uncorrectable left:\n{s}");
    std::fs::remove_dir_all(&dir).ok();
}
