//! The local-SSD backend over real VFIO, in a guest with an emulated Intel IOMMU: QEMU's own
//! `-device nvme` is bound to vfio-pci, and `vnvme serve` splits its namespace into two LBA
//! ranges served as namespaces of two controllers over vfio-user inside the guest.
//! `vnvme perf --verify` writes and reads through both; then the SSD gets a function-level
//! reset mid-I/O (sysfs `reset`): the front's client sees errors, not a hang, and I/O works
//! again after the backend's recovery. Afterwards the host finds every written block in
//! QEMU's disk image at its range's offset.

use vnvme_tests::guest::{
    BIND_QEMU_NVME_TO_VFIO, TempDir, harness_guest, run_ok, section, value, vnvme_binary_for_guest,
};

/// Blocks (512 B) in each half of the 1 GiB disk.
const HALF: u64 = 1 << 20;

/// Runs after [`BIND_QEMU_NVME_TO_VFIO`].
const SCRIPT: &str = r#"
cat >/tmp/ranges.toml <<EOT
[[controller]]
socket = "/tmp/f0.sock"
[[controller.namespace]]
backend = "nvme:pci:$BDF@1:0+512M"
[[controller]]
socket = "/tmp/f1.sock"
[[controller.namespace]]
backend = "nvme:pci:$BDF@1:512M+512M"
EOT
RUST_LOG=info /tmp/h/vnvme serve --config /tmp/ranges.toml >/tmp/serve.log 2>&1 &
for i in $(seq 100); do [ -S /tmp/f1.sock ] && break; sleep 0.1; done
perf() { RUST_LOG=warn /tmp/h/vnvme perf vfio-user:/tmp/$1.sock -q 8 -o 16384 -w randrw -M 50 -t $2 --verify --dma-mib 32 2>&1; }
for f in f0 f1; do
  echo @@PERF-$f-BEGIN; rc=0; perf $f 3 || rc=$?; echo "perf-$f-rc $rc"; echo @@PERF-$f-END
done
# a function-level reset of the SSD in the middle of I/O
echo @@FLR-BEGIN; rc=0
(sleep 2; r=0; echo 1 > /sys/bus/pci/devices/$BDF/reset || r=$?; echo; echo "flr-done $r") &
start=$(date +%s); perf f0 6 || rc=$?; wait $!
echo "flr-perf-rc $rc"; echo "flr-perf-secs $(( $(date +%s) - start ))"; echo @@FLR-END
echo @@AFTER-BEGIN; rc=0; perf f0 2 || rc=$?; echo "after-rc $rc"; echo @@AFTER-END
kill %1; wait
echo @@SERVE-BEGIN; cat /tmp/serve.log; echo @@SERVE-END
exit 0
"#;

#[test]
fn local_ssd_ranges_over_vfio_reach_qemus_disk_and_survive_a_reset() {
    let tmp = TempDir::new("local-ssd");
    let bin = vnvme_binary_for_guest(tmp.path());
    let img = tmp.path().join("ssd.raw");
    let guest = harness_guest(format!("{BIND_QEMU_NVME_TO_VFIO}{SCRIPT}"))
        .iommu()
        .qemu_nvme(&img, "")
        .file(&bin);
    let out = run_ok(&guest);
    let serve = section(&out, "@@SERVE");
    for f in ["f0", "f1"] {
        assert_eq!(
            value(&out, &format!("perf-{f}-rc")),
            Some("0"),
            "perf --verify through range {f} failed:\n{}\n{serve}",
            section(&out, &format!("@@PERF-{f}"))
        );
    }
    // the SSD DMAed straight into the client's memory. Only requests caught by the device
    // reset's window may bounce (their wait for the new mirror is bounded, 20 ms, which a
    // loaded TCG guest can miss): at most 1 % of what went zero-copy
    let counts: Vec<(u64, u64)> = serve
        .lines()
        .filter_map(|l| {
            let (_, rest) = l.split_once(" namespace 1: ")?;
            let (zc, rest) = rest.split_once(" bytes zero-copy, ")?;
            let (b, _) = rest.split_once(" bytes bounced")?;
            Some((zc.trim().parse().ok()?, b.trim().parse().ok()?))
        })
        .collect();
    assert!(
        counts.len() == 2 && counts.iter().all(|&(zc, b)| zc > 0 && b * 100 <= zc),
        "expected zero-copy I/O through the IOMMU on both ranges ({counts:?}):\n{serve}"
    );

    // the reset: commands in flight fail (perf reports errors) within seconds, no hang
    let flr = section(&out, "@@FLR");
    assert_eq!(value(&out, "flr-done"), Some("0"), "sysfs reset:\n{flr}");
    assert_ne!(value(&out, "flr-perf-rc"), Some("0"), "no errors?\n{flr}");
    assert!(flr.contains("commands failed"), "{flr}");
    let secs: u64 = value(&out, "flr-perf-secs").unwrap().parse().unwrap();
    assert!(secs < 20, "perf took {secs} s across the reset:\n{flr}");
    assert!(
        serve.contains("backend device recovered"),
        "no recovery in the log:\n{serve}"
    );
    // and the backend works again
    assert_eq!(
        value(&out, "after-rc"),
        Some("0"),
        "I/O after the recovery:\n{}\n{serve}",
        section(&out, "@@AFTER")
    );

    // perf stamps every written 512-byte block with its namespace LBA and namespace id 1:
    // the first range's blocks sit at their LBA, the second's 512 MiB further
    let data = std::fs::read(&img).expect("QEMU's image");
    let mut stamped = [0u64; 2];
    let mut wrong = 0u64;
    for (lba, block) in data.chunks(512).enumerate() {
        let lba = lba as u64;
        let tag = u64::from_le_bytes(block[..8].try_into().unwrap());
        let ns = u32::from_le_bytes(block[8..12].try_into().unwrap());
        if ns != 1 || tag == 0 {
            continue;
        }
        let half = usize::from(lba >= HALF);
        if tag == lba % HALF {
            stamped[half] += 1;
        } else {
            wrong += 1;
        }
    }
    assert!(
        stamped.iter().all(|&n| n >= 32),
        "stamped blocks per range: {stamped:?}\n{serve}"
    );
    assert_eq!(wrong, 0, "blocks stamped with another LBA");
}
