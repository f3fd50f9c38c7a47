//! The local-SSD path over vfio-user: guest -> vnvme (front, namespace `nvme:vfio-user:...`)
//! -> vfio-user -> vnvme (back, file namespace). fio write+verify in the guest passes (also
//! at queue depth 512, deeper than the front's queue pair to the back), and the bytes a
//! guest wrote are in the back's file at the right offset; the front moved them zero-copy
//! (the back DMAs straight into guest memory) and bounced nothing.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::Ordering;

use vnvme::config::Config;
use vnvme::daemon::Daemon;
use vnvme_tests::guest::{TempDir, harness_guest, run_ok, section, value};

const SCRIPT: &str = r#"
for i in $(seq 1 100); do [ -b /dev/nvme0n1 ] && break; sleep 0.1; done
D=/dev/nvme0n1
echo "size $(cat /sys/block/nvme0n1/size)"
echo @@FIO-BEGIN
fio --name=chain --filename=$D --direct=1 --ioengine=io_uring --rw=randwrite --bsrange=4k-128k \
  --numjobs=2 --iodepth=16 --size=24M --offset_increment=32M --verify=crc32c --verify_fatal=1 \
  --randrepeat=1 --group_reporting
echo "fio-rc $?"
echo @@FIO-END
# deeper than the nvme: backend's queue pair (255 commands): the front holds what the back
# cannot take yet, rather than fail it
echo @@DEEP-BEGIN
fio --name=deep --filename=$D --direct=1 --ioengine=io_uring --rw=randwrite --bs=4k \
  --iodepth=512 --iodepth_batch_submit=64 --size=16M --offset=64M --verify=crc32c \
  --verify_fatal=1 --randrepeat=1
echo "deep-rc $?"
echo @@DEEP-END
# a known pattern at 100 MiB, for the host to find in the back's file
yes VNVME-CHAIN-PATTERN | head -c 65536 > /tmp/pat
dd if=/tmp/pat of=$D bs=65536 seek=1600 count=1 oflag=direct 2>/dev/null && echo pattern-written
"#;

#[test]
fn guest_io_through_a_front_vnvme_to_a_back_vnvme_over_vfio_user() {
    let tmp = TempDir::new("chain");
    let d = tmp.path();
    let back_img = d.join("back.img");
    let back_cfg = Config::parse(
        &format!(
            // a rate limit, so that the guest's commands pile up in the front as behind a
            // busy SSD: the deep job keeps more in flight than the front's queue pair holds
            "[[controller]]\nsocket = \"{s}\"\nserial = \"BACK\"\niops_limit = 4000\n\
             [[controller.namespace]]\nbackend = \"file:{img}:128M\"\n",
            s = d.join("back.sock").display(),
            img = back_img.display()
        ),
        Path::new("back.toml"),
    )
    .unwrap();
    let back = Daemon::start(&back_cfg).expect("back daemon");
    let front_cfg = Config::parse(
        &format!(
            "[[controller]]\nsocket = \"{f}\"\nserial = \"FRONT\"\n\
             [[controller.namespace]]\nbackend = \"nvme:vfio-user:{b}\"\n",
            f = d.join("front.sock").display(),
            b = d.join("back.sock").display()
        ),
        Path::new("front.toml"),
    )
    .unwrap();
    let front = Daemon::start(&front_cfg).expect("front daemon connects to the back");
    let guest = harness_guest(SCRIPT).vfio_user(d.join("front.sock"));
    let out = run_ok(&guest);
    let transfer = front.transfer_stats(0, 1).expect("an nvme: namespace");
    let zero_copy = transfer.zero_copy_bytes.load(Ordering::Relaxed);
    let bounced = transfer.bounced_bytes.load(Ordering::Relaxed);
    // the guest's driver retries a failed command (a busy backend's Internal Error among
    // them) and fio may never see it: the front's own count of failed commands is the proof
    let io_errors = front.stats(0).expect("controller 0").io_errors();
    front
        .stop()
        .expect("front stops (flushes through the back)");
    back.stop().expect("back stops");
    assert_eq!(
        value(&out, "size"),
        Some("262144"),
        "128 MiB through the chain"
    );
    let fio = section(&out, "@@FIO");
    assert_eq!(
        value(&out, "fio-rc"),
        Some("0"),
        "fio verify failed:\n{fio}"
    );
    let deep = section(&out, "@@DEEP");
    assert_eq!(
        value(&out, "deep-rc"),
        Some("0"),
        "fio at queue depth 512 failed:\n{deep}"
    );
    assert!(
        io_errors.iter().all(|&(_, n)| n == 0),
        "the front failed guest commands: {io_errors:?}"
    );
    assert!(out.console.contains("pattern-written"));
    let mut got = vec![0u8; 65536];
    std::fs::File::open(&back_img)
        .unwrap()
        .read_exact_at(&mut got, 100 << 20)
        .unwrap();
    let want: Vec<u8> = b"VNVME-CHAIN-PATTERN\n"
        .iter()
        .copied()
        .cycle()
        .take(65536)
        .collect();
    assert!(
        got == want,
        "the back's file lacks the guest's pattern at 100 MiB"
    );
    // fio wrote and read 2 x 24 MiB; all of it, aligned, went zero-copy
    assert!(zero_copy > 96 << 20, "zero-copy bytes {zero_copy}");
    assert_eq!(
        bounced, 0,
        "aligned guest I/O was bounced ({zero_copy} zero-copy)"
    );
}
