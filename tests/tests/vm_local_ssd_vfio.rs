//! The local-SSD backend over real VFIO, in a guest with an emulated Intel IOMMU: QEMU's own
//! `-device nvme` is bound to vfio-pci, `vnvme serve --ns nvme:pci:...` serves it as a
//! namespace over vfio-user inside the guest, and `vnvme perf --verify` writes and reads
//! through it. Afterwards the host finds the written blocks in QEMU's disk image.

use vnvme_tests::guest::{
    BIND_QEMU_NVME_TO_VFIO, TempDir, harness_guest, run_ok, section, value, vnvme_binary_for_guest,
};

/// Runs after [`BIND_QEMU_NVME_TO_VFIO`].
const SCRIPT: &str = r#"
RUST_LOG=info /tmp/h/vnvme serve --socket /tmp/front.sock --ns nvme:pci:$BDF >/tmp/serve.log 2>&1 &
for i in $(seq 100); do [ -S /tmp/front.sock ] && break; sleep 0.1; done
echo @@PERF-BEGIN; rc=0
RUST_LOG=warn /tmp/h/vnvme perf vfio-user:/tmp/front.sock -q 8 -o 16384 -w randrw -M 50 -t 4 --verify --dma-mib 32 2>/dev/null || rc=$?
echo "perf-rc $rc"; echo @@PERF-END
kill %1; wait
echo @@SERVE-BEGIN; cat /tmp/serve.log; echo @@SERVE-END
exit 0
"#;

#[test]
fn local_ssd_backend_over_vfio_writes_reach_qemus_disk() {
    let tmp = TempDir::new("local-ssd");
    let bin = vnvme_binary_for_guest(tmp.path());
    let img = tmp.path().join("ssd.raw");
    let guest = harness_guest(format!("{BIND_QEMU_NVME_TO_VFIO}{SCRIPT}"))
        .iommu()
        .qemu_nvme(&img, "")
        .file(&bin);
    let out = run_ok(&guest);
    let perf = section(&out, "@@PERF");
    let serve = section(&out, "@@SERVE");
    assert_eq!(
        value(&out, "perf-rc"),
        Some("0"),
        "perf --verify through the VFIO backend failed:\n{perf}\n{serve}"
    );
    // perf stamps every written 512-byte block with its LBA and namespace id 1; a
    // namespace split by one worker covers the whole 1 GiB image
    let data = std::fs::read(&img).expect("QEMU's image");
    let mut stamped = 0u64;
    let mut wrong = 0u64;
    for (lba, block) in data.chunks(512).enumerate() {
        let tag = u64::from_le_bytes(block[..8].try_into().unwrap());
        let ns = u32::from_le_bytes(block[8..12].try_into().unwrap());
        if ns == 1 && tag != 0 {
            if tag == lba as u64 {
                stamped += 1;
            } else {
                wrong += 1;
            }
        }
    }
    assert!(
        stamped >= 32,
        "only {stamped} stamped blocks in the image\n{serve}"
    );
    assert_eq!(wrong, 0, "blocks stamped with another LBA");
    // the SSD DMAed straight into the client's memory: nothing bounced
    assert!(
        serve.contains(" bytes zero-copy, 0 bytes bounced")
            && !serve.contains(": 0 bytes zero-copy"),
        "expected zero-copy I/O through the IOMMU:\n{serve}"
    );
}
