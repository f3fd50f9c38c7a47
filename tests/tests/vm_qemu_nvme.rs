//! Control run: a guest with QEMU's own NVMe controller, exercised with nvme-cli and a
//! verifying fio job. Later tests run the same checks against vnvme over vfio-user.

use vnvme_tests::guest::{TempDir, harness_guest, looks_like_json, run_ok, section, value};

/// The guest script; prints each result between `@@<NAME>-BEGIN` / `@@<NAME>-END` lines.
const SCRIPT: &str = r#"
i=0; while [ ! -b /dev/nvme0n1 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
echo @@NVME-LIST-BEGIN
nvme list
echo @@NVME-LIST-END
echo @@ID-CTRL-BEGIN
nvme id-ctrl /dev/nvme0 -o json
echo @@ID-CTRL-END
engine=libaio
if fio --enghelp 2>/dev/null | grep -qw io_uring \
   && fio --name=probe --filename=/dev/nvme0n1 --direct=1 --ioengine=io_uring --rw=read \
          --bs=4k --size=4k >/dev/null 2>&1; then
  engine=io_uring
fi
echo "@@FIO-ENGINE $engine"
echo @@FIO-BEGIN
rc=0
fio --name=verify --filename=/dev/nvme0n1 --direct=1 --ioengine=$engine --rw=randwrite \
    --bs=4k --size=32M --iodepth=16 --verify=crc32c --do_verify=1 --verify_fatal=1 || rc=$?
echo @@FIO-END
echo "@@FIO-RC $rc"
"#;

#[test]
fn qemu_nvme_control_run() {
    let tmp = TempDir::new("qemu-nvme");
    let guest = harness_guest(SCRIPT).qemu_nvme(tmp.path().join("disk0.raw"), "");
    let out = run_ok(&guest);
    eprintln!(
        "qemu nvme control run: {:.1} s ({})",
        out.elapsed.as_secs_f64(),
        out.accel
    );

    let list = section(&out, "@@NVME-LIST");
    assert!(
        list.contains("/dev/nvme0n1"),
        "nvme list shows no /dev/nvme0n1:\n{list}"
    );
    assert!(
        list.contains("vnvmeq0"),
        "nvme list lacks serial vnvmeq0:\n{list}"
    );
    assert!(
        list.contains("QEMU NVMe Ctrl"),
        "nvme list lacks the model:\n{list}"
    );

    let id = section(&out, "@@ID-CTRL");
    assert!(
        looks_like_json(id),
        "id-ctrl -o json is not one JSON object:\n{id}"
    );
    for key in ["\"vid\"", "\"sn\"", "\"mn\"", "vnvmeq0"] {
        assert!(id.contains(key), "id-ctrl JSON lacks {key}:\n{id}");
    }
    let vid = id
        .lines()
        .find(|l| l.contains("\"vid\""))
        .unwrap_or_default();
    assert!(
        vid.contains("6966"),
        "vid is not Red Hat's 0x1b36 (6966): {vid}"
    );

    let engine = value(&out, "@@FIO-ENGINE").unwrap_or("?");
    let fio = section(&out, "@@FIO");
    assert_eq!(
        value(&out, "@@FIO-RC"),
        Some("0"),
        "fio ({engine}) failed:\n{fio}"
    );
    let errors: Vec<&str> = fio
        .lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("verify")
                && (l.contains("fail") || l.contains("bad") || l.contains("mismatch"))
        })
        .collect();
    assert!(
        errors.is_empty(),
        "fio reported verify errors: {errors:#?}\n{fio}"
    );
    let err_values: Vec<&str> = fio
        .split("err=")
        .skip(1)
        .map(|rest| {
            rest.trim_start()
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .unwrap_or("")
        })
        .collect();
    assert!(
        !err_values.is_empty(),
        "fio printed no err= summary:\n{fio}"
    );
    assert!(
        err_values.iter().all(|v| *v == "0"),
        "fio err= values {err_values:?}:\n{fio}"
    );
    assert!(fio.contains("write:"), "fio shows no writes:\n{fio}");
}
