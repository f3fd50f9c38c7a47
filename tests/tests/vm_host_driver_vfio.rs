//! The user-space host driver over VFIO against a device model we did not write: a guest
//! with an emulated Intel IOMMU binds QEMU's own `-device nvme` to vfio-pci and runs
//! `vnvme identify pci:...` and `vnvme perf ... --verify` on it.

use vnvme_tests::guest::{
    BIND_QEMU_NVME_TO_VFIO, TempDir, harness_guest, run_ok, section, value, vnvme_binary_for_guest,
};

/// Runs after [`BIND_QEMU_NVME_TO_VFIO`].
const SCRIPT: &str = r#"
echo @@ID-BEGIN; RUST_LOG=warn /tmp/h/vnvme identify --json pci:$BDF; echo @@ID-END
echo @@PERF-BEGIN; rc=0; RUST_LOG=warn /tmp/h/vnvme perf pci:$BDF -q 8 -o 8192 -w randrw -M 50 -t 3 --verify --dma-mib 16 2>/dev/null || rc=$?; echo "perf-rc $rc"; echo @@PERF-END
rc=0; RUST_LOG=warn /tmp/h/vnvme identify vfio-user:/nonexistent.sock || rc=$?; echo "bad-target-rc $rc"
rc=0; RUST_LOG=warn /tmp/h/vnvme identify pci:0000:00:1f.7 || rc=$?; echo "bad-pci-rc $rc"
exit 0
"#;

#[test]
fn host_driver_over_vfio_against_qemu_nvme_in_a_guest() {
    let tmp = TempDir::new("vfio");
    let bin = vnvme_binary_for_guest(tmp.path());
    let guest = harness_guest(format!("{BIND_QEMU_NVME_TO_VFIO}{SCRIPT}"))
        .iommu()
        .qemu_nvme(tmp.path().join("disk.raw"), ",cmb_size_mb=16")
        .file(&bin);
    let out = run_ok(&guest);
    assert!(
        value(&out, "vfio").is_some_and(|v| !v.is_empty()),
        "no /dev/vfio group:\n{}",
        out.console
    );
    let id: serde_json::Value = serde_json::from_str(section(&out, "@@ID").trim())
        .unwrap_or_else(|e| panic!("identify --json: {e}\n{}", out.console));
    assert!(
        id["mn"].as_str().is_some_and(|m| m.contains("QEMU NVMe")),
        "{id}"
    );
    assert_eq!(id["vid"], 0x1b36, "{id}");
    // QEMU's CMB (cmb_size_mb=16): SQs, lists and data, in BAR 2 at offset 0
    let cmb = &id["cmb"];
    assert_eq!(cmb["bytes"], 16u64 << 20, "{id}");
    assert_eq!(
        (&cmb["bar"], &cmb["offset"]),
        (&2.into(), &0.into()),
        "{id}"
    );
    assert_eq!(cmb["sqs"], true, "{id}");
    let ns = &id["namespaces"][0];
    assert_eq!(ns["bytes"], 1u64 << 30, "the 1 GiB image: {id}");
    let perf = section(&out, "@@PERF");
    assert_eq!(
        value(&out, "perf-rc"),
        Some("0"),
        "perf --verify failed:\n{perf}"
    );
    assert!(perf.contains("Total") && perf.contains("p99.99"), "{perf}");
    assert_ne!(
        value(&out, "bad-target-rc"),
        Some("0"),
        "a missing socket must fail"
    );
}
