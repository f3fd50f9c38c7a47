//! A real guest on a thin volume (issue 19): the stock Linux nvme driver sees the thin
//! bit; fio writes with crc32c verify while the host takes a snapshot, clones it and
//! attaches the clone as a second namespace; the guest reads the clone: it holds the data
//! flushed before the snapshot, and does not change when the origin is overwritten; fio
//! verifies again after; the volume grown while attached shows its new size in the guest.
//! One boot for all of it (TCG boots are slow). The `kill -9` and
//! restart case is `host_lvol` (host driver, no guest).

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vnvme::config::Config;
use vnvme::daemon::Daemon;
use vnvme_tests::guest::{TempDir, harness_guest, run_ok, section, value};

const FIO: &str = "fio --name=verify --filename=/dev/nvme0n1 --direct=1 --ioengine=io_uring \
 --rw=randwrite --bsrange=4k-64k --numjobs=2 --iodepth=8 --size=8M --offset=16M \
 --offset_increment=16M --loops=3 --verify=crc32c --verify_fatal=1 --randrepeat=1 \
 --group_reporting";

fn call(d: &mut Daemon, method: &str, p: &Value) -> Value {
    vnvme::rpc::methods::call(d, method, p).unwrap_or_else(|e| panic!("{method}: {}", e.message))
}

#[test]
fn fio_verify_on_a_thin_volume_with_a_snapshot_cloned_and_attached_during_it() {
    let tmp = TempDir::new("vm-lvol");
    let text = format!(
        "[[lvstore]]\nname = \"pool\"\nbackend = \"file:{0}/pool.img:256M\"\n\
         [[lvstore.volume]]\nname = \"vol\"\nsize = \"64M\"\nthin = true\n\
         [[controller]]\nsocket = \"{0}/v.sock\"\nnamespace_pool = \"lvs:pool\"\n\
         [[controller.namespace]]\nbackend = \"lvol:pool/vol\"\n",
        tmp.path().display()
    );
    let cfg = Config::parse(&text, Path::new("vm_lvol.toml")).unwrap();
    let mut d = Daemon::start(&cfg).expect("daemon");
    let script = format!(
        r#"for i in $(seq 1 100); do [ -b /dev/nvme0n1 ] && break; sleep 0.1; done
echo "nsfeat $(nvme id-ns /dev/nvme0n1 | grep -i '^nsfeat' | awk '{{print $3}}')"
dd if=/dev/urandom of=/tmp/A bs=65536 count=128 2>/dev/null
dd if=/tmp/A of=/dev/nvme0n1 bs=65536 oflag=direct conv=fsync 2>/dev/null
echo "a $(sha256sum </tmp/A | cut -c1-16)"
echo @@FIO-BEGIN; {FIO}; echo "fio-rc $?"; echo @@FIO-END
for i in $(seq 1 600); do [ -b /dev/nvme0n2 ] && break; nvme ns-rescan /dev/nvme0 2>/dev/null; sleep 0.2; done
echo "clone $(dd if=/dev/nvme0n2 bs=65536 count=128 iflag=direct 2>/dev/null | sha256sum | cut -c1-16)"
dd if=/dev/urandom of=/dev/nvme0n1 bs=65536 count=128 oflag=direct conv=fsync 2>/dev/null
echo "clone-after $(dd if=/dev/nvme0n2 bs=65536 count=128 iflag=direct 2>/dev/null | sha256sum | cut -c1-16)"
echo "origin-after $(dd if=/dev/nvme0n1 bs=65536 count=128 iflag=direct 2>/dev/null | sha256sum | cut -c1-16)"
for i in $(seq 1 300); do [ "$(cat /sys/block/nvme0n1/size)" = 196608 ] && break; dd if=/dev/nvme0n1 of=/dev/null bs=4096 count=1 iflag=direct 2>/dev/null; sleep 0.2; done
echo "size-after $(cat /sys/block/nvme0n1/size)"
echo @@REVERIFY-BEGIN; {FIO} --verify_only; echo "fio-rc $?"; echo @@REVERIFY-END
"#
    );
    let guest = harness_guest(script).vfio_user(tmp.path().join("v.sock"));
    let run = std::thread::spawn(move || run_ok(&guest));

    // fio has started once the volume maps more than the 8 MiB the guest wrote first
    let used = |d: &mut Daemon| -> u64 {
        call(d, "lvol_list", &json!({}))
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "pool/vol")
            .map_or(0, |v| v["used"].as_u64().unwrap())
    };
    let t = Instant::now();
    while used(&mut d) < 12 << 20 {
        assert!(t.elapsed() < Duration::from_mins(10), "fio never started");
        if run.is_finished() {
            // the guest ended before its fio wrote: its console says why
            run.join().expect("guest");
            panic!("the guest ended before fio started");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let t = Instant::now();
    call(
        &mut d,
        "lvol_snapshot",
        &json!({"name": "pool/vol", "snapshot_name": "snap"}),
    );
    let took = t.elapsed();
    call(
        &mut d,
        "lvol_clone",
        &json!({"snapshot": "pool/snap", "clone_name": "clone"}),
    );
    let nqn = call(&mut d, "subsystem_list", &json!({}))[0]["nqn"]
        .as_str()
        .unwrap()
        .to_owned();
    let cntlid = call(&mut d, "controller_list", &json!({}))[0]["cntlid"].clone();
    let nsid = call(
        &mut d,
        "ns_add",
        &json!({"nqn": nqn, "backend": "lvol:pool/clone"}),
    )["nsid"]
        .clone();
    call(
        &mut d,
        "ns_attach",
        &json!({"nqn": nqn, "nsid": nsid, "controllers": [cntlid]}),
    );
    // grown while attached and in use: the guest sees the new size
    call(
        &mut d,
        "lvol_resize",
        &json!({"name": "pool/vol", "size": "96M"}),
    );
    eprintln!("snapshot under the guest's fio took {took:?}; clone attached as namespace {nsid}");

    let out = run.join().expect("guest");
    let list = call(&mut d, "lvol_list", &json!({}));
    d.stop().expect("daemon stops");
    assert_eq!(
        value(&out, "nsfeat"),
        Some("0x1"),
        "thin bit: {}",
        out.console
    );
    let fio = section(&out, "@@FIO");
    assert!(
        fio.contains("fio-rc 0") && fio.contains("err= 0") && !fio.contains("verify: bad"),
        "{fio}"
    );
    let re = section(&out, "@@REVERIFY");
    assert!(re.contains("fio-rc 0") && re.contains("err= 0"), "{re}");
    let a = value(&out, "a").expect("pattern");
    assert_eq!(
        value(&out, "clone"),
        Some(a),
        "the clone holds what was flushed before the snapshot"
    );
    assert_eq!(
        value(&out, "clone-after"),
        Some(a),
        "the clone does not follow the origin"
    );
    assert_ne!(
        value(&out, "origin-after"),
        Some(a),
        "the origin was overwritten"
    );
    eprintln!(
        "guest size after the resize: {:?}",
        value(&out, "size-after")
    );
    assert_eq!(
        value(&out, "size-after"),
        Some("196608"),
        "96 MiB in 512-byte sectors"
    );
    eprintln!("volumes after: {list}");
    let check = std::process::Command::new(vnvme_tests::guest::vnvme_binary())
        .args([
            "lvs-check",
            &format!("file:{}/pool.img", tmp.path().display()),
        ])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
}
