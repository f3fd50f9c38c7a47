//! The `nvme:` backend host-side: a front vnvme whose namespace lives on a back vnvme over
//! vfio-user, driven by the independent test client. PRP-compatible requests go zero-copy,
//! a byte-aligned SGL bounces, and both land the right data.

use std::path::Path;
use std::sync::atomic::Ordering;

use vnvme::config::Config;
use vnvme::daemon::Daemon;
use vnvme_tests::guest::TempDir;
use vnvme_tests::nvme_client::{NvmeClient, cmd, with_prp2};

fn daemon(text: &str) -> Daemon {
    let _ = env_logger::builder().is_test(true).try_init();
    Daemon::start(&Config::parse(text, Path::new("t.toml")).unwrap()).unwrap()
}

/// A back vnvme with a 16 MiB RAM namespace, and a front vnvme whose namespace 1 is the
/// back's namespace 1 over vfio-user (`back.sock`, `front.sock` in `tmp`).
fn back_and_front(tmp: &TempDir) -> (Daemon, Daemon) {
    back_and_front_of(tmp, "malloc:16M")
}

/// [`back_and_front`] with the back's namespace on `backend`.
fn back_and_front_of(tmp: &TempDir, backend: &str) -> (Daemon, Daemon) {
    let d = tmp.path().display();
    let back = daemon(&format!(
        "[[controller]]\nsocket = \"{d}/back.sock\"\n[[controller.namespace]]\nbackend = \"{backend}\"\n"
    ));
    let front = daemon(&format!(
        "[[controller]]\nsocket = \"{d}/front.sock\"\n\
         [[controller.namespace]]\nbackend = \"nvme:vfio-user:{d}/back.sock\"\n"
    ));
    (back, front)
}

#[test]
fn zero_copy_for_prps_bounce_for_an_unaligned_sgl() {
    let tmp = TempDir::new("nvme-backend");
    let (back, front) = back_and_front(&tmp);
    let stats = front.transfer_stats(0, 1).unwrap();
    let mut n = NvmeClient::connect(&tmp.path().join("front.sock"));
    n.create_io_queues();
    let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 31 % 253) as u8).collect();

    // 8 KiB from a page-aligned buffer with PRPs: zero copy
    n.mem_write(0x20000, &pattern);
    assert!(
        n.submit(1, with_prp2(cmd(0x01, 1, 0x20000, &[16, 0, 15]), 0x21000))
            .ok()
    );
    let zc = stats.zero_copy_bytes.load(Ordering::Relaxed);
    assert_eq!((zc, stats.bounced_bytes.load(Ordering::Relaxed)), (8192, 0));

    // 4 KiB from an odd address through an SGL data block: not expressible as PRPs
    n.mem_write(0x30001, &pattern[..4096]);
    let mut sgl = cmd(0x01, 1, 0, &[64, 0, 7]);
    sgl[1] = 0x40; // PSDT: SGL for data
    sgl[24..32].copy_from_slice(&0x30001u64.to_le_bytes());
    sgl[32..36].copy_from_slice(&4096u32.to_le_bytes()); // length; type 0 = data block
    assert!(n.submit(1, sgl).ok(), "SGL write");
    assert_eq!(stats.bounced_bytes.load(Ordering::Relaxed), 4096);

    // both read back right (zero copy again)
    n.mem_fill(0x40000, 8192, 0);
    assert!(
        n.submit(1, with_prp2(cmd(0x02, 1, 0x40000, &[16, 0, 15]), 0x41000))
            .ok()
    );
    let mut back_data = vec![0u8; 8192];
    n.mem_read(0x40000, &mut back_data);
    let first_bad = back_data.iter().zip(&pattern).position(|(a, b)| a != b);
    assert!(
        back_data == pattern,
        "PRP-written data differs from byte {first_bad:?}: {:?}",
        &back_data[..16]
    );
    assert!(n.submit(1, cmd(0x02, 1, 0x40000, &[64, 0, 7])).ok());
    n.mem_read(0x40000, &mut back_data[..4096]);
    assert!(back_data[..4096] == pattern[..4096], "SGL-written data");
    assert_eq!(
        stats.zero_copy_bytes.load(Ordering::Relaxed),
        8192 + 8192 + 4096
    );

    // Write Zeroes on the back's queue pair (completed asynchronously): LBAs 16..20 zeroed
    let c = n.submit(1, cmd(0x08, 1, 0, &[16, 0, 3]));
    assert!(c.ok(), "write zeroes: {c:?}");
    n.mem_fill(0x40000, 8192, 0xee);
    assert!(
        n.submit(1, with_prp2(cmd(0x02, 1, 0x40000, &[16, 0, 15]), 0x41000))
            .ok()
    );
    n.mem_read(0x40000, &mut back_data);
    assert!(back_data[..2048].iter().all(|&x| x == 0), "zeroed");
    assert!(
        back_data[2048..] == pattern[2048..],
        "past the zeroed blocks"
    );
    drop(n);
    front.stop().unwrap();
    back.stop().unwrap();
}

#[test]
fn back_device_gone_gives_the_front_guest_errors_not_a_hang() {
    let tmp = TempDir::new("nvme-backend-gone");
    let (back, front) = back_and_front(&tmp);
    let mut n = NvmeClient::connect(&tmp.path().join("front.sock"));
    n.create_io_queues();
    assert!(
        n.submit(1, cmd(0x02, 1, 0x20000, &[0, 0, 7])).ok(),
        "read before"
    );
    back.stop().unwrap();
    let t = std::time::Instant::now();
    let cid = n.submit_nowait(1, cmd(0x02, 1, 0x20000, &[0, 0, 7]));
    let c = n
        .wait(1, cid, std::time::Duration::from_secs(20))
        .expect("the command completes, with an error");
    assert!(!c.ok(), "{c:?}");
    assert!(
        t.elapsed() < std::time::Duration::from_secs(15),
        "{:?}",
        t.elapsed()
    );
    // later commands fail at once; the front controller itself keeps working
    let t = std::time::Instant::now();
    assert!(!n.submit(1, cmd(0x01, 1, 0x20000, &[0, 0, 7])).ok());
    assert!(t.elapsed() < std::time::Duration::from_secs(1));
    assert!(
        n.submit(0, cmd(0x06, 0, 0x10000, &[1])).ok(),
        "identify still works"
    );
    drop(n);
    front.stop().unwrap();
}

#[test]
fn guest_memory_mirror_follows_the_front_client_and_is_dropped_when_it_leaves() {
    let tmp = TempDir::new("nvme-backend-mirror");
    let (back, front) = back_and_front(&tmp);
    // the back sees the front's driver memory only
    assert_eq!(back.dma_regions(0), Some(1));
    let mut n = NvmeClient::connect(&tmp.path().join("front.sock"));
    n.create_io_queues();
    assert!(n.submit(1, cmd(0x02, 1, 0x20000, &[0, 0, 7])).ok());
    assert_eq!(front.dma_regions(0), Some(1), "the test client's memory");
    assert_eq!(back.dma_regions(0), Some(2), "mirrored after the first I/O");
    drop(n);
    let t = std::time::Instant::now();
    while back.dma_regions(0) != Some(1) {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(5),
            "the mirror outlived the front's client"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    front.stop().unwrap();
    back.stop().unwrap();
}

/// Write 4 KiB of `byte` at LBA `lba` of namespace 1 and read it back.
fn write_and_check(n: &mut NvmeClient, lba: u32, byte: u8) {
    n.mem_fill(0x20000, 4096, byte);
    let c = n.submit(1, cmd(0x01, 1, 0x20000, &[lba, 0, 7]));
    assert!(c.ok(), "write: {c:?}");
    n.mem_fill(0x30000, 4096, 0);
    assert!(
        n.submit(1, cmd(0x02, 1, 0x30000, &[lba, 0, 7])).ok(),
        "read"
    );
    let mut got = vec![0u8; 4096];
    n.mem_read(0x30000, &mut got);
    assert!(got.iter().all(|&b| b == byte), "read back {:?}", &got[..8]);
}

/// Namespace size (NSZE) from Identify Namespace.
fn nsze(n: &mut NvmeClient) -> u64 {
    assert!(n.submit(0, cmd(0x06, 1, 0x50000, &[0])).ok());
    let mut id = [0u8; 8];
    n.mem_read(0x50000, &mut id);
    u64::from_le_bytes(id)
}

#[test]
fn one_back_namespace_split_into_ranges_for_two_front_controllers() {
    let tmp = TempDir::new("nvme-backend-ranges");
    let d = tmp.path().display();
    let back = daemon(&format!(
        "[[controller]]\nsocket = \"{d}/back.sock\"\n[[controller.namespace]]\nbackend = \"malloc:16M\"\n"
    ));
    let front_config = |ranges: [&str; 2]| {
        format!(
            "[[controller]]\nsocket = \"{d}/f0.sock\"\n\
             [[controller.namespace]]\nbackend = \"nvme:vfio-user:{d}/back.sock@1:{}\"\n\
             [[controller]]\nsocket = \"{d}/f1.sock\"\n\
             [[controller.namespace]]\nbackend = \"nvme:vfio-user:{d}/back.sock@1:{}\"\n",
            ranges[0], ranges[1]
        )
    };
    // bad ranges are refused at start, with the reason (and the device let go of again)
    for (ranges, why) in [
        (["0+8M", "4M+8M"], "overlap"),
        (["0+8M", "12M+8M"], "runs past its end"),
        (["0+8M", "8M+1000"], "multiple of its 512-byte blocks"),
    ] {
        let cfg = Config::parse(&front_config(ranges), Path::new("t.toml")).unwrap();
        let e = Daemon::start(&cfg).unwrap_err();
        let mut err = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            err.push_str(": ");
            err.push_str(&s.to_string());
            src = s.source();
        }
        assert!(err.contains(why), "{ranges:?}: {err}");
    }
    // two front controllers share the back's one connection, each on its own queue pair
    let front = daemon(&front_config(["0+8M", "8M+8M"]));
    let mut first = NvmeClient::connect(&tmp.path().join("f0.sock"));
    let mut second = NvmeClient::connect(&tmp.path().join("f1.sock"));
    first.create_io_queues();
    second.create_io_queues();
    assert_eq!(
        (nsze(&mut first), nsze(&mut second)),
        (16384, 16384),
        "8 MiB each"
    );
    write_and_check(&mut first, 0, 0xaa);
    write_and_check(&mut second, 0, 0xbb);
    write_and_check(&mut second, 16376, 0xbc); // the last 8 blocks
    // each range ends where it ends
    let c = second.submit(1, cmd(0x02, 1, 0x30000, &[16384, 0, 0]));
    assert_eq!(c.status & 0x7ff, 0x80, "LBA Out of Range: {c:?}");
    write_and_check(&mut first, 0, 0xaa); // the second's writes stayed out of this range
    drop((first, second));
    front.stop().unwrap();
    // on the back: a's block 0 at LBA 0, b's block 0 at LBA 16384, b's last at the end
    let mut n = NvmeClient::connect(&tmp.path().join("back.sock"));
    n.create_io_queues();
    for (lba, byte) in [(0u32, 0xaau8), (16384, 0xbb), (32767, 0xbc)] {
        assert!(n.submit(1, cmd(0x02, 1, 0x30000, &[lba, 0, 0])).ok());
        let mut got = [0u8; 512];
        n.mem_read(0x30000, &mut got);
        assert!(
            got.iter().all(|&x| x == byte),
            "back LBA {lba}: {:?}",
            &got[..4]
        );
    }
    drop(n);
    back.stop().unwrap();
}

/// An array of `nvme:` members behind a vfio-user namespace moves the guest's data
/// zero-copy: the array's namespace gives its controller's guest memory to the members,
/// which map it for their device as a plain `nvme:` namespace does (issue 18: "data is
/// never bounced"). A raid0 over two back vnvmes, a verified perf through the front; each
/// member's counters in `raid_list` show the guest's bytes moved zero-copy, and only the
/// array's own metadata (superblocks) bounced.
#[test]
fn an_array_of_nvme_members_moves_guest_data_zero_copy() {
    use host_driver::NvmeDriver;
    use host_driver::transport::vfio_user::VfioUserTransport;
    use vnvme::perf::{Pattern, PerfOptions};

    let tmp = TempDir::new("nvme-array");
    let d = tmp.path().display();
    let backs: Vec<Daemon> = (0..2)
        .map(|i| {
            daemon(&format!(
                "[[controller]]\nsocket = \"{d}/back{i}.sock\"\n[[controller.namespace]]\nbackend = \"malloc:64M\"\n"
            ))
        })
        .collect();
    let mut front = daemon(&format!(
        "[[array]]\nname = \"r0\"\nlevel = \"raid0\"\n\
         members = [\"nvme:vfio-user:{d}/back0.sock\", \"nvme:vfio-user:{d}/back1.sock\"]\n\
         [[controller]]\nsocket = \"{d}/front.sock\"\n\
         [[controller.namespace]]\nbackend = \"array:r0\"\n"
    ));
    let link = VfioUserTransport::connect(&tmp.path().join("front.sock")).expect("connect");
    let mut ctrl = NvmeDriver::new(Box::new(link), 32 << 20, 2).expect("bring-up");
    let opts = PerfOptions {
        queue_depth: 16,
        io_size: 16384,
        pattern: Pattern::Randrw,
        read_percent: 50,
        duration: std::time::Duration::from_secs(2),
        workers: 1,
        verify: true,
        shadow_doorbells: false,
    };
    let run = vnvme::perf::run(&mut ctrl, &opts, |_, _| {})
        .unwrap()
        .total();
    assert!(
        run.ios > 200 && run.errors == 0 && run.verify_failures == 0,
        "{run:?}"
    );
    drop(ctrl);
    let list = vnvme::rpc::methods::call(&mut front, "raid_list", &serde_json::json!({})).unwrap();
    let moved = run.ios * 16384;
    let (mut zero_copy, mut bounced) = (0, 0);
    for m in list[0]["members"].as_array().unwrap() {
        let z = m["zero_copy_bytes"]
            .as_u64()
            .unwrap_or_else(|| panic!("{m}"));
        let b = m["bounced_bytes"].as_u64().unwrap_or_else(|| panic!("{m}"));
        assert!(z > 0, "a member moved nothing zero-copy: {list}");
        zero_copy += z;
        bounced += b;
    }
    eprintln!("guest bytes {moved}, zero copy {zero_copy}, bounced {bounced}");
    assert!(
        zero_copy >= moved * 9 / 10 && bounced <= moved / 20,
        "guest bytes {moved}: zero copy {zero_copy}, bounced {bounced}: {list}"
    );
    front.stop().unwrap();
    for b in backs {
        b.stop().unwrap();
    }
}

/// A Deallocate range longer than one Write Zeroes command carries (65536 blocks) goes to the
/// back as one command after the other, each continuing where the last ended: every block
/// of the range reads as zeroes, the block after it keeps its data.
#[test]
fn a_long_deallocate_range_goes_as_several_commands() {
    let tmp = TempDir::new("nvme-backend-dsm");
    let (back, front) = back_and_front_of(&tmp, "malloc:128M");
    let mut n = NvmeClient::connect(&tmp.path().join("front.sock"));
    n.create_io_queues();
    const RANGE: u32 = 150_000; // blocks: three back commands (65536 + 65536 + 18928)
    let marked = [0, 65_535, 65_536, 131_072, RANGE - 1, RANGE];
    for (i, &lba) in marked.iter().enumerate() {
        n.mem_fill(0x20000, 512, 0xa0 + i as u8);
        assert!(
            n.submit(1, cmd(0x01, 1, 0x20000, &[lba, 0, 0])).ok(),
            "write {lba}"
        );
    }
    // Dataset Management, Deallocate, one range: (context attributes, NLB, SLBA)
    let mut range = [0u8; 16];
    range[4..8].copy_from_slice(&RANGE.to_le_bytes());
    n.mem_write(0x30000, &range);
    let c = n.submit(1, cmd(0x09, 1, 0x30000, &[0, 1 << 2]));
    assert!(c.ok(), "deallocate: {c:?}");
    for (i, &lba) in marked.iter().enumerate() {
        n.mem_fill(0x40000, 512, 0xee);
        assert!(
            n.submit(1, cmd(0x02, 1, 0x40000, &[lba, 0, 0])).ok(),
            "read {lba}"
        );
        let mut got = [0u8; 512];
        n.mem_read(0x40000, &mut got);
        let want = if lba < RANGE { 0 } else { 0xa0 + i as u8 };
        assert!(got.iter().all(|&b| b == want), "LBA {lba}: {:?}", &got[..4]);
    }
    drop(n);
    front.stop().unwrap();
    back.stop().unwrap();
}
