//! A real guest on an array (issue 18): the stock Linux nvme driver on a vfio-user namespace
//! backed by a raid10 of four file members; fio writes with crc32c verify while a member is
//! removed and re-added (a partial rebuild under the guest's I/O); fio verifies again after;
//! the mirrors of each pair end byte-identical.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vnvme::config::Config;
use vnvme::daemon::Daemon;
use vnvme_tests::guest::{harness_guest, run_ok, section};

const FIO: &str = "fio --name=verify --filename=/dev/nvme0n1 --direct=1 --ioengine=io_uring \
 --rw=randwrite --bsrange=4k-128k --numjobs=4 --iodepth=16 --size=24M --offset_increment=30M \
 --verify=crc32c --verify_fatal=1 --randrepeat=1 --group_reporting";

fn raid(d: &mut Daemon) -> Value {
    vnvme::rpc::methods::call(d, "raid_list", &json!({})).expect("raid_list")[0].clone()
}

#[test]
fn raid10_of_four_files_under_fio_verify_with_a_member_removed_and_re_added() {
    let dir = std::env::temp_dir().join(format!("vnvme-vm-raid-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let imgs: Vec<_> = (0..4).map(|i| dir.join(format!("m{i}.img"))).collect();
    let members: Vec<String> = imgs
        .iter()
        .map(|p| format!("\"file:{}:64M\"", p.display()))
        .collect();
    let cfg = Config::parse(
        &format!(
            "[[array]]\nname = \"r10\"\nlevel = \"raid10\"\nmembers = [{}]\nstrip_size_kb = 64\n\
             [[controller]]\nsocket = \"{}/a.sock\"\n\
             [[controller.namespace]]\nbackend = \"array:r10\"\n",
            members.join(", "),
            dir.display()
        ),
        Path::new("vm_raid.toml"),
    )
    .unwrap();
    let mut daemon = Daemon::start(&cfg).expect("daemon starts");
    let script = format!(
        r#"for i in $(seq 1 100); do [ -b /dev/nvme0n1 ] && break; sleep 0.1; done
echo "size $(cat /sys/block/nvme0n1/size)"
echo @@FIO-BEGIN; {FIO}; echo "fio-rc $?"; echo @@FIO-END
sleep 5
echo @@REVERIFY-BEGIN; {FIO} --verify_only; echo "fio-rc $?"; echo @@REVERIFY-END
"#
    );
    let guest = harness_guest(script).vfio_user(dir.join("a.sock"));
    let run = std::thread::spawn(move || run_ok(&guest));

    // once the guest's fio is writing: member 1 (leg 0's mirror) goes, then comes back
    let t = Instant::now();
    while raid(&mut daemon)["ops"].as_u64().unwrap_or(0) < 300 {
        assert!(t.elapsed() < Duration::from_mins(10), "fio never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    let m1 = format!("file:{}:64M", imgs[1].display());
    vnvme::rpc::methods::call(
        &mut daemon,
        "raid_remove_member",
        &json!({"name": "r10", "member": m1}),
    )
    .expect("remove");
    assert_eq!(raid(&mut daemon)["state"], "degraded");
    std::thread::sleep(Duration::from_secs(1));
    let added = vnvme::rpc::methods::call(
        &mut daemon,
        "raid_add_member",
        &json!({"name": "r10", "member": m1}),
    )
    .expect("re-add");
    assert_eq!(added["rebuild"], "partial", "{added}");
    let ops_at_add = raid(&mut daemon)["ops"].as_u64().unwrap();
    let t = Instant::now();
    let st = loop {
        let st = raid(&mut daemon);
        if st["last_rebuild"]["finished"] == true {
            break st;
        }
        assert!(t.elapsed() < Duration::from_mins(5), "{st}");
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("rebuild under the guest's fio: {}", st["last_rebuild"]);
    let out = run.join().expect("guest");
    let after = raid(&mut daemon);
    daemon.stop().expect("daemon stops");
    let fio = section(&out, "@@FIO");
    assert!(
        fio.contains("fio-rc 0") && fio.contains("err= 0") && !fio.contains("verify: bad"),
        "{fio}"
    );
    let re = section(&out, "@@REVERIFY");
    assert!(re.contains("fio-rc 0") && re.contains("err= 0"), "{re}");
    assert!(
        after["ops"].as_u64().unwrap() > ops_at_add,
        "guest I/O went on after the re-add"
    );
    assert_eq!(after["state"], "online", "{after}");
    let copied = st["last_rebuild"]["bytes_copied"].as_u64().unwrap();
    assert!(
        copied < 63 << 20,
        "partial: {copied} bytes of a 63 MiB member"
    );
    // each pair's mirrors hold the same data
    for (a, b) in [(0, 1), (2, 3)] {
        let (x, y) = (
            std::fs::read(&imgs[a]).unwrap(),
            std::fs::read(&imgs[b]).unwrap(),
        );
        assert!(x[1 << 20..] == y[1 << 20..], "members {a} and {b} differ");
    }
    std::fs::remove_dir_all(&dir).ok();
}
