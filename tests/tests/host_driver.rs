//! The user-space host driver (`host-driver/`) over vfio-user against `vnvme serve`
//! in-process: null, malloc and file namespaces; identify, data written and read back, queue
//! creation at the limits, reset under I/O, and a server that goes away mid-I/O.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use host_driver::transport::vfio_user::VfioUserTransport;
use host_driver::{DriverError, IoQueuePair, NvmeDriver, Request};
use nvme_spec::Status;
use vnvme::config::Config;
use vnvme::daemon::Daemon;

fn start(tag: &str) -> (Daemon, PathBuf, PathBuf) {
    start_with(tag, 4)
}

fn start_with(tag: &str, max_io_queues: u16) -> (Daemon, PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("vnvme-hd-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text = format!(
        "[[controller]]\nsocket = \"{d}/c.sock\"\nserial = \"HOSTDRV\"\nmax_io_queues = {max_io_queues}\n\
         [[controller.namespace]]\nbackend = \"null:1G\"\n\
         [[controller.namespace]]\nbackend = \"malloc:32M\"\n\
         [[controller.namespace]]\nbackend = \"file:{d}/ns3.img:32M\"\nblock_size = 4096\n",
        d = dir.display()
    );
    let cfg = Config::parse(&text, Path::new("host_driver.toml")).unwrap();
    let d = Daemon::start(&cfg).unwrap();
    (d, dir.join("c.sock"), dir)
}

fn open(sock: &Path) -> NvmeDriver {
    let t = VfioUserTransport::connect(sock).expect("connect");
    NvmeDriver::new(Box::new(t), 16 << 20, 8).expect("bring-up")
}

/// Submit-and-wait on an I/O queue pair.
fn wait_one(qp: &mut IoQueuePair) -> Request {
    qp.ring();
    let t = Instant::now();
    loop {
        let mut got = None;
        qp.poll(1, |r| got = Some(r));
        if let Some(r) = got {
            return r;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "no completion");
        std::hint::spin_loop();
    }
}

#[test]
fn identify_data_queues_and_reset_under_io() {
    let (d, sock, dir) = start("main");
    let mut c = open(&sock);
    let (_, serial, _) = c.names();
    assert_eq!(serial, "HOSTDRV");
    let ns: Vec<(u32, u64, u32)> = c
        .namespaces()
        .iter()
        .map(|n| (n.nsid, n.blocks, n.block_size))
        .collect();
    assert_eq!(
        ns,
        vec![(1, 2 << 20, 512), (2, 64 << 10, 512), (3, 8 << 10, 4096)]
    );
    assert_eq!(c.io_queue_count(), 4, "asked 8, the controller has 4");
    assert_eq!(c.max_transfer(), 512 << 10, "MDTS 7");

    // Data: 64 KiB (a PRP list) written and read back on malloc and file namespaces.
    let dma = std::sync::Arc::clone(c.dma());
    let mut out = dma.alloc(64 << 10).unwrap();
    let pattern: Vec<u8> = (0..64 << 10).map(|i: u32| (i * 7 % 251) as u8).collect();
    out.as_mut_slice().copy_from_slice(&pattern);
    let mut qp = c.create_io_queue_pair(64).unwrap();
    for (nsid, bs) in [(2u32, 512u64), (3, 4096)] {
        let blocks = (65536 / bs) as u32;
        qp.read_write(true, nsid, 8, blocks, out.iova(), out.len(), 1)
            .unwrap();
        assert!(wait_one(&mut qp).status.is_success(), "write ns {nsid}");
        let back = dma.alloc(64 << 10).unwrap();
        qp.read_write(false, nsid, 8, blocks, back.iova(), back.len(), 2)
            .unwrap();
        assert!(wait_one(&mut qp).status.is_success(), "read ns {nsid}");
        assert!(back.as_slice() == &pattern[..], "ns {nsid} data");
        qp.flush(nsid, 3).unwrap();
        assert!(wait_one(&mut qp).status.is_success());
        qp.write_zeroes(nsid, 8, 1, 4).unwrap();
        assert!(wait_one(&mut qp).status.is_success());
        qp.read_write(false, nsid, 8, blocks, back.iova(), back.len(), 5)
            .unwrap();
        assert!(wait_one(&mut qp).status.is_success());
        assert!(
            back.as_slice()[..bs as usize].iter().all(|&b| b == 0),
            "zeroed"
        );
        assert!(back.as_slice()[bs as usize..] == pattern[bs as usize..]);
    }
    // Past the end: LBA Out of Range from the controller, not a driver error.
    qp.read_write(false, 2, 64 << 10, 1, out.iova(), 4096, 6)
        .unwrap();
    assert_eq!(wait_one(&mut qp).status, Status::LBA_OUT_OF_RANGE);

    // Queue limits: 4 pairs granted; the largest size the controller allows; one more fails.
    let mut pairs = vec![qp];
    for _ in 0..3 {
        pairs.push(c.create_io_queue_pair(1024).unwrap());
    }
    let e = c.create_io_queue_pair(16).unwrap_err();
    assert!(matches!(e, DriverError::Invalid(_)), "{e}");
    for p in pairs.drain(..) {
        c.delete_io_queue_pair(p).unwrap();
    }
    let e = c.create_io_queue_pair(1025).unwrap_err();
    assert_eq!(
        NvmeDriver::status_of(&e),
        Some(Status::INVALID_QUEUE_SIZE),
        "{e}"
    );

    // Reset under I/O: 32 reads in flight, reset, new queue pair, I/O works.
    let mut qp = c.create_io_queue_pair(64).unwrap();
    for i in 0..32 {
        qp.read_write(false, 1, i * 8, 8, out.iova(), 4096, i)
            .unwrap();
    }
    qp.ring();
    c.reset().unwrap();
    drop(qp);
    let mut qp = c.create_io_queue_pair(64).unwrap();
    qp.read_write(false, 2, 8, 128, out.iova(), out.len(), 7)
        .unwrap();
    assert!(wait_one(&mut qp).status.is_success());
    assert!(
        out.as_slice()[512..] == pattern[512..] && out.as_slice()[..512].iter().all(|&b| b == 0),
        "data (block 8 zeroed, the rest the pattern) survived the reset"
    );
    c.delete_io_queue_pair(qp).unwrap();
    drop(c);
    d.stop().unwrap();
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn a_second_client_is_refused_not_left_hanging() {
    let (daemon, sock, dir) = start("busy");
    let c = open(&sock);
    let t = Instant::now();
    let second = VfioUserTransport::connect(&sock);
    assert!(second.is_err(), "second client accepted");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    drop(c);
    // once the first client is gone, the next one is served
    let t = Instant::now();
    loop {
        match VfioUserTransport::connect(&sock) {
            Ok(tr) => {
                drop(NvmeDriver::new(Box::new(tr), 4 << 20, 1).expect("next client"));
                break;
            }
            Err(e) => assert!(t.elapsed() < Duration::from_secs(5), "{e}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    daemon.stop().unwrap();
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn server_gone_mid_io_gives_errors_not_a_hang() {
    let (d, sock, dir) = start("gone");
    let mut c = open(&sock);
    let mut qp = c.create_io_queue_pair(64).unwrap();
    let buf = c.dma().alloc(4096).unwrap();
    for i in 0..16 {
        qp.read_write(false, 1, i, 1, buf.iova(), 4096, i).unwrap();
    }
    qp.ring();
    d.stop().unwrap();
    let t = Instant::now();
    let e = c.create_io_queue_pair(16).unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(matches!(e, DriverError::Transport(_)), "{e}");
    assert!(c.check_health().is_err());
    // Polling a queue whose server is gone returns nothing; it does not block.
    let t = Instant::now();
    for _ in 0..1000 {
        qp.poll(64, |_| {});
    }
    assert!(t.elapsed() < Duration::from_secs(1));
    drop(qp);
    drop(c); // shutdown fails quietly
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn perf_verify_passes_on_ram_and_file_and_catches_the_null_namespace() {
    use vnvme::perf::{Pattern, PerfOptions};
    let (daemon, sock, dir) = start("perf");
    let mut c = open(&sock);
    let opts = PerfOptions {
        queue_depth: 16,
        io_size: 8192,
        pattern: Pattern::Randrw,
        read_percent: 50,
        duration: Duration::from_millis(1500),
        workers: 1,
        verify: true,
        shadow_doorbells: false,
    };
    // one worker x 3 namespaces = 3 queue pairs of the 4 granted
    let r = vnvme::perf::run(&mut c, &opts, |_, _| {}).expect("perf runs");
    let total = r.total();
    assert_eq!(r.jobs.len(), 3);
    assert!(total.ios > 1000, "{} I/Os", total.ios);
    assert_eq!(total.errors, 0);
    // the null namespace discards writes, so --verify must catch it; RAM and file keep data
    for j in &r.jobs {
        assert_eq!(j.verify_failures > 0, j.nsid == 1, "namespace {}", j.nsid);
    }
    assert!(total.latency.percentile(50.0) > 0);
    let text = vnvme::perf::format_report(&c.target(), &r);
    assert!(
        text.contains("NSID 3 from worker 0") && text.contains("p99.99"),
        "{text}"
    );
    // more queue pairs than granted: a clear error, nothing created
    let too_many = PerfOptions { workers: 2, ..opts };
    let e = vnvme::perf::run(&mut c, &too_many, |_, _| {}).unwrap_err();
    assert!(e.to_string().contains("granted 4"), "{e}");
    drop(c);
    daemon.stop().unwrap();
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn temperature_event_reaches_the_driver_and_two_workers_share_the_namespaces() {
    use nvme_spec::Submission;
    let (daemon, sock, dir) = start_with("aer", 8);
    let mut c = open(&sock);
    let set = |c: &mut NvmeDriver, fid: u32, value: u32| {
        let mut s = Submission::default();
        s.opcode = 0x09;
        s.cdw10 = fid.into();
        s.cdw11 = value.into();
        c.admin_command("Set Features", s, None)
    };
    // enable temperature warnings, then put the over-temperature threshold below the
    // controller's 308 K: a SMART / Health event, information 01h, log page 02h
    set(&mut c, 0x0b, 1 << 1).unwrap();
    assert!(c.take_events().is_empty());
    set(&mut c, 0x04, 300).unwrap();
    let t = Instant::now();
    let mut events = Vec::new();
    while events.is_empty() && t.elapsed() < Duration::from_secs(5) {
        set(&mut c, 0x0b, 1 << 1).unwrap(); // any admin command polls the admin queue
        events = c.take_events();
    }
    assert_eq!(events, vec![0x0002_0101]);

    // two workers x three namespaces = six queue pairs (the controller grants 8 here)
    let opts = vnvme::perf::PerfOptions {
        queue_depth: 4,
        io_size: 4096,
        pattern: vnvme::perf::Pattern::Randwrite,
        read_percent: 0,
        duration: Duration::from_millis(500),
        workers: 2,
        verify: false,
        shadow_doorbells: false,
    };
    let r = vnvme::perf::run(&mut c, &opts, |_, _| {}).expect("two workers");
    assert_eq!(r.jobs.len(), 6);
    assert!(
        r.jobs.iter().all(|j| j.ios > 0 && j.errors == 0),
        "{:?}",
        r.jobs
    );
    drop(c);
    daemon.stop().unwrap();
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn timed_out_command_abort_then_reset_fails_it_and_io_resumes() {
    let (daemon, sock, dir) = start("timeout");
    let mut c = open(&sock);
    let buf = c.dma().alloc(4096).unwrap();
    let mut qps = vec![c.create_io_queue_pair(16).unwrap()];
    // A command the controller never sees (its doorbell is not rung): it times out.
    let cid = qps[0]
        .read_write(false, 2, 0, 8, buf.iova(), 4096, 42)
        .unwrap();
    for _ in 0..3 {
        qps[0].tick();
    }
    assert!(qps[0].overdue(4).is_empty());
    assert_eq!(qps[0].overdue(3), vec![(cid, 42)]);
    let sqid = qps[0].qid();
    // vnvme declines to abort (allowed by the spec); then the host resets.
    assert!(!c.abort(sqid, cid).unwrap());
    let mut failed = Vec::new();
    c.reset_queue_pairs(&mut qps, |q, r| failed.push((q, r.user, r.status)))
        .unwrap();
    assert_eq!(failed, vec![(sqid, 42, Status::HOST_ABORTED)]);
    assert_eq!(qps[0].outstanding(), 0);
    qps[0]
        .read_write(false, 2, 0, 8, buf.iova(), 4096, 7)
        .unwrap();
    assert!(
        wait_one(&mut qps[0]).status.is_success(),
        "I/O after recovery"
    );
    drop(c);
    daemon.stop().unwrap();
    std::fs::remove_dir_all(dir).ok();
}
