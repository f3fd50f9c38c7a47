//! Hostile vfio-user clients (issue 14, tenant isolation). Each test starts the daemon
//! in-process with two controllers on ONE shared reactor: "a" is attacked, "b" is the
//! neighbour. For every attack: the daemon survives (the test process is the daemon), the
//! neighbour completes a verified I/O run with no error (during the attack where it can
//! overlap), the attacked controller recovers (a new client brings it up and runs verified
//! I/O) or reports CSTS.CFS, the attacker gets the exact error reply, and `stop()` returns
//! promptly.

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use host_driver::NvmeDriver;
use host_driver::transport::vfio_user::VfioUserTransport;
use vnvme::config::Config;
use vnvme::daemon::Daemon;
use vnvme::perf::{Pattern, PerfOptions, Report};
use vnvme_tests::guest::{TempDir, vnvme_binary};
use vnvme_tests::hostile::{
    BAR0, CSTS_CFS, CSTS_RDY, DATA_BUF, GUEST_MEM, Guest, INTX, IO_QSIZE, MSIX, REG_CC, Raw,
    SPARE_BUF, WRITE_BUF, command, eventfd, header, memfd, pipe, set_len,
};
use vnvme_tests::nvme_client::{cmd, with_prp2};

// ---------------------------------------------------------------------------------------
// Helpers: the daemon, the neighbour's verified I/O run, recovery of the attacked controller.
// ---------------------------------------------------------------------------------------

/// A daemon with controllers "a" (attacked) and "b" (neighbour) on one shared reactor.
struct Setup {
    /// A's backend process, when it has one: dropped (resumed and killed) before the
    /// daemon, so a daemon waiting on it is never left waiting on a frozen process.
    back: Option<BackProcess>,
    daemon: Daemon,
    a: PathBuf,
    b: PathBuf,
    dir: TempDir,
}

const SERIAL_A: &str = "HOSTILE-A";
const SERIAL_B: &str = "NEIGHBOUR-B";

fn start(tag: &str) -> Setup {
    start_in(TempDir::new(&format!("hostile-{tag}")), "malloc:32M", None)
}

/// The daemon in `dir`, controller a's namespace on `a_backend` (served by `back`, if any).
fn start_in(dir: TempDir, a_backend: &str, back: Option<BackProcess>) -> Setup {
    let _ = env_logger::builder().is_test(true).try_init();
    let d = dir.path().display();
    let text = format!(
        "reactors = 1\n\
         [[controller]]\nsocket = \"{d}/a.sock\"\nserial = \"{SERIAL_A}\"\n\
         [[controller.namespace]]\nbackend = \"{a_backend}\"\n\
         [[controller]]\nsocket = \"{d}/b.sock\"\nserial = \"{SERIAL_B}\"\n\
         [[controller.namespace]]\nbackend = \"malloc:32M\"\n"
    );
    let cfg = Config::parse(&text, Path::new("hostile.toml")).unwrap();
    let daemon = Daemon::start(&cfg).expect("daemon start");
    Setup {
        back,
        a: dir.path().join("a.sock"),
        b: dir.path().join("b.sock"),
        daemon,
        dir,
    }
}

impl Setup {
    /// The daemon stops promptly (no thread is held by what a client did).
    fn stop(self) {
        self.stop_within(Duration::from_secs(5));
    }

    fn stop_within(self, limit: Duration) {
        let t = Instant::now();
        self.daemon.stop().expect("daemon stop");
        assert!(t.elapsed() < limit, "stop took {:?}", t.elapsed());
        eprintln!("daemon stopped in {:?}", t.elapsed());
    }
}

/// A host-driver controller on `sock` (as tests/host_driver.rs opens one).
fn open(sock: &Path) -> NvmeDriver {
    let t = VfioUserTransport::connect(sock).expect("connect");
    NvmeDriver::new(Box::new(t), 16 << 20, 8).expect("bring-up")
}

/// A verified random read/write run on every namespace of `c`.
fn verified_run(c: &mut NvmeDriver, duration: Duration) -> Report {
    let opts = PerfOptions {
        queue_depth: 8,
        io_size: 4096,
        pattern: Pattern::Randrw,
        read_percent: 50,
        duration,
        workers: 1,
        verify: true,
        shadow_doorbells: false,
    };
    vnvme::perf::run(c, &opts, |_, _| {}).expect("perf run")
}

fn assert_clean(r: &Report, who: &str) {
    let t = r.total();
    assert!(t.ios > 0, "{who}: no I/O completed: {t:?}");
    assert_eq!(t.errors, 0, "{who}: failed commands: {t:?}");
    for j in &r.jobs {
        assert_eq!(j.verify_failures, 0, "{who}: verify mismatches: {j:?}");
    }
}

/// Run `attack` while the neighbour `b` runs ~1 s of verified I/O on its own connection
/// (the attack starts once the neighbour's controller is up); the neighbour must be clean.
fn during_neighbour_io<R>(b: &Path, attack: impl FnOnce() -> R) -> R {
    let (up_tx, up_rx) = std::sync::mpsc::channel();
    let b = b.to_owned();
    let neighbour = std::thread::spawn(move || {
        let mut c = open(&b);
        assert_eq!(c.names().1, SERIAL_B);
        up_tx.send(()).unwrap();
        verified_run(&mut c, Duration::from_secs(1))
    });
    up_rx.recv().expect("neighbour bring-up");
    let r = attack();
    let report = neighbour.join().expect("neighbour thread");
    assert_clean(&report, "neighbour b");
    r
}

/// The attacked controller serves the next client: bring-up, Identify, verified I/O.
fn assert_recovers(a: &Path) {
    let mut c = open(a);
    assert_eq!(c.names().1, SERIAL_A, "attacked controller identifies");
    assert_clean(
        &verified_run(&mut c, Duration::from_millis(300)),
        "attacked controller after the attack",
    );
}

/// After an attack that may legitimately kill controller `a`: it is either ready and
/// working, or reports Controller Fatal Status.
fn assert_ready_or_fatal(g: &mut Guest, what: &str) -> bool {
    let csts = g.csts();
    let fatal = csts & CSTS_CFS != 0;
    assert!(
        fatal || csts & CSTS_RDY != 0,
        "{what}: CSTS {csts:#x}: neither ready nor fatal"
    );
    fatal
}

fn errno_of(f: impl FnOnce() -> i32) -> Option<i32> {
    (f() != 0).then(|| std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
}

// Admin commands (opcode, cdw10.., no data unless a PRP is given).
fn get_features(fid: u32) -> [u8; 64] {
    cmd(0x0a, 0, 0, &[fid])
}
fn set_features(fid: u32, cdw11: u32) -> [u8; 64] {
    cmd(0x09, 0, 0, &[fid, cdw11])
}
const FID_KEEP_ALIVE: u32 = 0x0f;
const FID_NUMBER_OF_QUEUES: u32 = 0x07;

/// The eventfd counter (resets it); 0 when it is zero.
fn read_counter(fd: &OwnedFd) -> u64 {
    let mut v = 0u64;
    // SAFETY: reading 8 bytes into a local u64 from a non-blocking eventfd we own.
    let n = unsafe { libc::read(fd.as_raw_fd(), (&raw mut v).cast(), 8) };
    if n == 8 { v } else { 0 }
}

/// Send `half` of a message on a new connection to `sock`; returns the connection and when.
fn wedge(sock: &Path, half: &[u8]) -> (Raw, Instant) {
    let raw = Raw::connect(sock);
    vnvme_tests::hostile::send_with_fds(&raw.stream, half, &[]).expect("send the half");
    (raw, Instant::now())
}

/// Wait for the server to close `raw`: EOF or a reset within 8 s; returns how long it took.
fn wait_closed(raw: &mut Raw, since: Instant) -> Duration {
    raw.stream
        .set_read_timeout(Some(Duration::from_secs(8)))
        .unwrap();
    let r = std::io::Read::read(&mut raw.stream, &mut [0u8; 64]);
    let waited = since.elapsed();
    match r {
        Ok(0) => waited,
        Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => waited,
        other => panic!("after {waited:?}: expected the server to close, got {other:?}"),
    }
}

/// SET_IRQS on MSI-X from vector 0 with `n` fresh eventfds in one message.
fn set_irqs_with_eventfds(g: &mut Guest, n: usize) -> Option<i32> {
    let fds: Vec<OwnedFd> = (0..n).map(|_| eventfd()).collect();
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    g.raw.set_irqs(MSIX, 0, &raw).error()
}

// ---------------------------------------------------------------------------------------
// The attacks.
// ---------------------------------------------------------------------------------------

/// Attack: shrink, grow or re-seal the BAR0 doorbell memfd the server hands out, then ring
/// every doorbell with garbage. Expected: every change of the file fails with EPERM (sealed
/// SHRINK|GROW|SEAL), the file keeps its size, garbage doorbells leave the controller ready
/// or fatal and it can be reset and used again.
#[test]
fn doorbell_memfd_is_sealed_and_garbage_doorbells_are_contained() {
    let s = start("doorbell");
    let mut g = Guest::connect(&s.a);
    let fd = g.bar0_fd.as_raw_fd();
    // SAFETY: fcntl F_GET_SEALS on a descriptor we own.
    let seals = unsafe { libc::fcntl(fd, libc::F_GET_SEALS) };
    let want = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    assert_eq!(seals & want, want, "seals {seals:#x}");
    let size = std::fs::File::from(g.bar0_fd.try_clone().unwrap())
        .metadata()
        .unwrap()
        .len();
    during_neighbour_io(&s.b, || {
        for len in [0, 0x1000, 1 << 30] {
            let e = set_len(g.bar0_fd.as_fd(), len).expect_err("ftruncate of a sealed memfd");
            assert_eq!(e.raw_os_error(), Some(libc::EPERM), "ftruncate to {len:#x}");
        }
        // SAFETY: fcntl F_ADD_SEALS with an integer argument on a descriptor we own.
        let e = errno_of(|| unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_WRITE) });
        assert_eq!(e, Some(libc::EPERM), "F_SEAL_SEAL: no more seals");
        let meta = std::fs::File::from(g.bar0_fd.try_clone().unwrap()).metadata();
        assert_eq!(meta.unwrap().len(), size, "doorbell file keeps its size");

        assert_eq!(g.identify_serial(), SERIAL_A);
        for round in [u32::MAX, 0x8000_0000, 1000, 63] {
            for i in 0..g.doorbell_count() {
                g.ring(i, round.wrapping_add(i as u32));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_ready_or_fatal(&mut g, "after garbage doorbells");
        g.enable();
        assert_eq!(g.identify_serial(), SERIAL_A, "after a reset");
    });
    drop(g);
    assert_recovers(&s.a);
    s.stop();
}

/// Attack: DMA_MAP file descriptors that cannot back the announced range: a 4 KiB memfd
/// announced as 1 GiB, a range past its end, a pipe, a socket, an eventfd, /dev/zero, a
/// directory. Expected: each is refused with EINVAL; a regular file or memfd that holds the
/// range is accepted (the check is about the backing, not the kind of file).
#[test]
fn dma_map_refuses_fds_that_cannot_back_the_range() {
    let s = start("dmamap");
    let small = memfd(c"small", 4096);
    let (pipe_r, _pipe_w) = pipe();
    let (sock, _peer) = UnixStream::pair().unwrap();
    let efd = eventfd();
    let zero = std::fs::File::open("/dev/zero").unwrap();
    let dir = std::fs::File::open(s.dir.path()).unwrap();
    let file_path = s.dir.path().join("backing");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&file_path)
        .unwrap();
    file.set_len(8192).unwrap();
    let mut raw = Raw::connect(&s.a);
    during_neighbour_io(&s.b, || {
        let iova = 1 << 32;
        let bad: [(&str, RawFd, u64, u64); 7] = [
            (
                "4 KiB memfd announced as 1 GiB",
                small.as_raw_fd(),
                0,
                1 << 30,
            ),
            ("range past the memfd's end", small.as_raw_fd(), 4096, 4096),
            ("pipe", pipe_r.as_raw_fd(), 0, 4096),
            ("socket", sock.as_raw_fd(), 0, 4096),
            ("eventfd", efd.as_raw_fd(), 0, 4096),
            ("/dev/zero", zero.as_raw_fd(), 0, 4096),
            ("directory", dir.as_raw_fd(), 0, 4096),
        ];
        for (what, fd, offset, size) in bad {
            let mut p = vnvme_tests::hostile::le32(&[32, 3]);
            for v in [offset, iova, size] {
                p.extend_from_slice(&v.to_le_bytes());
            }
            let r = raw.request(command::DMA_MAP, &p, &[fd]);
            assert_eq!(r.error(), Some(libc::EINVAL), "DMA_MAP of a {what}");
        }
        // what a well-behaved client maps is still accepted, then unmapped
        assert_eq!(
            raw.dma_map(Some(small.as_fd()), 0, iova, 4096).error(),
            None
        );
        assert_eq!(
            raw.dma_map(Some(file.as_fd()), 4096, iova + 4096, 4096)
                .error(),
            None
        );
        assert_eq!(raw.dma_unmap(iova, 8192).error(), None);
        // the server still answers register reads
        assert_eq!(raw.read32(0x8) >> 16, 1, "VS major version");
    });
    drop(raw);
    assert_recovers(&s.a);
    s.stop();
}

/// Attack: DMA_MAP a memfd properly, run the controller's queues in it with 500 64 KiB
/// writes queued, then ftruncate the memfd to 0 and ring the admin and I/O doorbells again.
/// Expected: the reactor (shared with the neighbour) faults on the lost pages and the
/// daemon's SIGBUS containment maps zero pages over them (counted); the daemon lives, the
/// neighbour is clean, controller a is ready or fatal and serves the next client.
#[test]
fn truncating_mapped_guest_memory_costs_only_the_client_that_did_it() {
    let s = start("truncate");
    let mut g = Guest::connect(&s.a);
    g.create_io_queues();
    let before = device_model::memory_fault::faults();
    during_neighbour_io(&s.b, || {
        g.queue_writes(500);
        g.truncate_memory();
        for tail in 1..=5 {
            g.ring(0, tail); // admin SQEs now read from a hole
        }
        g.ring(2, 600); // and more I/O SQEs
        std::thread::sleep(Duration::from_millis(200));
        let fatal = assert_ready_or_fatal(&mut g, "after the truncation");
        eprintln!("controller a after losing its memory: fatal = {fatal}");
    });
    let faults = device_model::memory_fault::faults() - before;
    assert!(faults > 0, "the daemon never touched the truncated memory");
    eprintln!("{faults} lost pages replaced by zero pages");
    drop(g);
    assert_recovers(&s.a);
    s.stop();
}

/// Attack: SET_IRQS with a pipe, a regular file or a socket as the interrupt "eventfd"
/// (MSI-X vector 0 and INTx); then a real eventfd whose counter the client fills to its
/// maximum and never reads, and 800 admin commands that each signal it.
/// Expected: the non-eventfds are refused with EINVAL; the eventfd is accepted and made
/// non-blocking, so the reactor drops signals instead of blocking in write(): the admin
/// commands all complete and the neighbour on the same reactor stays clean.
#[test]
fn interrupt_fds_must_be_eventfds_and_a_full_one_never_blocks_the_reactor() {
    let s = start("irq");
    let mut g = Guest::connect(&s.a);
    let (_pipe_r, pipe_w) = pipe();
    let file = memfd(c"not-an-eventfd", 4096);
    let (sock, _peer) = UnixStream::pair().unwrap();
    for (what, fd) in [
        ("pipe", pipe_w.as_raw_fd()),
        ("regular file", file.as_raw_fd()),
        ("socket", sock.as_raw_fd()),
    ] {
        for (index, start) in [(MSIX, 0), (INTX, 0)] {
            let r = g.raw.set_irqs(index, start, &[fd]);
            assert_eq!(
                r.error(),
                Some(libc::EINVAL),
                "SET_IRQS {index} with a {what}"
            );
        }
    }

    let efd = eventfd();
    assert_eq!(g.raw.set_irqs(MSIX, 0, &[efd.as_raw_fd()]).error(), None);
    // SAFETY: fcntl F_GETFL on a descriptor we own.
    let fl = unsafe { libc::fcntl(efd.as_raw_fd(), libc::F_GETFL) };
    assert_ne!(
        fl & libc::O_NONBLOCK,
        0,
        "the server made the eventfd non-blocking"
    );
    assert!(g.admin(get_features(FID_NUMBER_OF_QUEUES)).ok());
    // the interrupt follows the completion entry: give it a moment
    let t = Instant::now();
    while read_counter(&efd) == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "admin completions interrupt on vector 0"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let full = u64::MAX - 1;
    // SAFETY: writing 8 bytes from a local u64 to our eventfd.
    let written = unsafe { libc::write(efd.as_raw_fd(), (&raw const full).cast(), 8) };
    assert_eq!(written, 8, "eventfd counter filled");

    during_neighbour_io(&s.b, || {
        for i in 0..800 {
            let c = g.admin(get_features(FID_NUMBER_OF_QUEUES));
            assert!(
                c.ok(),
                "admin command {i} with a full interrupt eventfd: {c:?}"
            );
        }
    });
    assert_eq!(
        read_counter(&efd),
        full,
        "the counter never moved past its maximum"
    );
    assert_eq!(g.csts() & (CSTS_RDY | CSTS_CFS), CSTS_RDY);
    drop(g);
    assert_recovers(&s.a);
    s.stop();
}

/// Attack: Set Features Keep Alive Timer with KATO = FFFFFFFFh (about 50 days), the value
/// most likely to overflow a timer computed in 32 bits or rounded up to 100 ms.
/// Expected: success; Get Features reports it (at least the largest 100 ms multiple below
/// 2^32, not a wrapped small value); the controller does not go fatal within 1.2 s without a
/// Keep Alive, and admin commands keep working.
#[test]
fn keep_alive_timeout_ffffffff_does_not_overflow_into_a_fatal_controller() {
    let s = start("kato");
    let mut g = Guest::connect(&s.a);
    let c = g.admin(set_features(FID_KEEP_ALIVE, u32::MAX));
    assert!(c.ok(), "Set Features KATO FFFFFFFFh: {c:?}");
    let c = g.admin(get_features(FID_KEEP_ALIVE));
    assert!(c.ok(), "Get Features KATO: {c:?}");
    assert!(c.dw0 >= 4_294_967_200, "KATO read back as {:#x}", c.dw0);
    during_neighbour_io(&s.b, || {
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(1200) {
            assert_eq!(g.csts() & CSTS_CFS, 0, "fatal after {:?}", t.elapsed());
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    assert_eq!(g.identify_serial(), SERIAL_A);
    assert_eq!(g.csts() & (CSTS_RDY | CSTS_CFS), CSTS_RDY);
    drop(g);
    assert_recovers(&s.a);
    s.stop();
}

/// Attack: a header announcing a 1 MiB message followed by 100 bytes, then silence with the
/// socket held open; then 8 bytes of a header and silence; then the 1 MiB half again and
/// the daemon is stopped.
/// Expected: the neighbour works meanwhile; the server drops each connection after its 5 s
/// message deadline (the attacker reads EOF within 3..8 s) and serves the next client; with
/// a half-sent message pending, `stop()` returns within a few seconds.
#[test]
fn a_half_sent_message_neither_holds_the_connection_nor_blocks_stop() {
    let s = start("halfsent");
    let mut body_half = header(7, command::REGION_WRITE, 1 << 20).to_vec();
    body_half.extend_from_slice(&[0xa5; 100]);
    let header_half = &header(8, command::REGION_READ, 32)[..8];
    let (mut raw, t) = wedge(&s.a, &body_half);
    let waited = during_neighbour_io(&s.b, || wait_closed(&mut raw, t));
    assert!(
        waited >= Duration::from_secs(3),
        "1 MiB message: connection dropped after {waited:?}"
    );
    drop(raw);
    assert_recovers(&s.a);

    let (mut raw, t) = wedge(&s.a, header_half);
    let waited = wait_closed(&mut raw, t);
    assert!(
        waited >= Duration::from_secs(3),
        "half a header: connection dropped after {waited:?}"
    );
    drop(raw);
    assert_recovers(&s.a);

    let (_raw, _) = wedge(&s.a, &body_half);
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    s.daemon.stop().expect("stop");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "stop took {:?}",
        t.elapsed()
    );
    eprintln!("stop with a half-sent message pending: {:?}", t.elapsed());
}

/// Attack: one message carrying far more fds than the max_msg_fds the server advertised
/// (SET_IRQS with as many eventfds as vectors, so only the fd count is wrong; DMA_MAP).
/// Expected: an error reply with EINVAL ("too many file descriptors"), and the server keeps
/// serving: a SET_IRQS with exactly max_msg_fds eventfds is accepted, Identify works.
#[test]
fn a_flood_of_fds_in_one_message_is_refused() {
    let s = start("fds");
    let mut g = Guest::connect(&s.a);
    let max = g.raw.max_msg_fds;
    assert!(max >= 1);
    during_neighbour_io(&s.b, || {
        for n in [max + 16, 253] {
            let e = set_irqs_with_eventfds(&mut g, n);
            assert_eq!(e, Some(libc::EINVAL), "SET_IRQS with {n} fds (max {max})");
            let page = memfd(c"page", 4096);
            let fds = vec![page.as_raw_fd(); n]; // one memfd, sent n times
            let mut payload = vnvme_tests::hostile::le32(&[32, 3]);
            for v in [0u64, 1 << 40, 4096] {
                payload.extend_from_slice(&v.to_le_bytes());
            }
            let r = g.raw.request(command::DMA_MAP, &payload, &fds);
            assert_eq!(
                r.error(),
                Some(libc::EINVAL),
                "DMA_MAP with {n} fds (max {max})"
            );
        }
        let e = set_irqs_with_eventfds(&mut g, max);
        assert_eq!(e, None, "exactly max_msg_fds eventfds");
        assert_eq!(g.identify_serial(), SERIAL_A);
    });
    drop(g);
    assert_recovers(&s.a);
    s.stop();
}

/// Attack: one or two fds more than max_msg_fds in one message (SET_IRQS with 17 and 18
/// eventfds when 16 are advertised; MSI-X has 129 vectors, so only the fd count is wrong).
/// Expected: an error reply with EINVAL, like the flood above.
#[test]
fn one_or_two_fds_over_max_msg_fds_are_refused() {
    let s = start("fds1");
    let mut g = Guest::connect(&s.a);
    let max = g.raw.max_msg_fds;
    for n in [max + 1, max + 2] {
        let e = set_irqs_with_eventfds(&mut g, n);
        assert_eq!(e, Some(libc::EINVAL), "SET_IRQS with {n} fds (max {max})");
    }
    assert_eq!(g.identify_serial(), SERIAL_A);
    drop(g);
    s.stop();
}

/// Attack: DMA_MAP one region more than the max_dma_maps the server advertised (4 KiB
/// regions of one memfd at distinct IOVAs; the limit comes from RLIMIT_NOFILE).
/// Expected: every map up to the limit succeeds, the next one (with or without an fd) is
/// refused with EINVAL, unmapping them all frees the budget; the neighbour is clean.
#[test]
fn dma_maps_past_max_dma_maps_are_refused() {
    let s = start("maxmaps");
    let mut raw = Raw::connect(&s.a);
    let limit = raw.max_dma_maps;
    assert!((1..=4096).contains(&limit), "max_dma_maps {limit}");
    let fd = memfd(c"page", 4096);
    let iova = |i: usize| (1u64 << 32) + i as u64 * 0x10000;
    during_neighbour_io(&s.b, || {
        for i in 0..limit {
            let r = raw.dma_map(Some(fd.as_fd()), 0, iova(i), 4096);
            assert_eq!(r.error(), None, "map {i} of {limit}");
        }
        let r = raw.dma_map(Some(fd.as_fd()), 0, iova(limit), 4096);
        assert_eq!(
            r.error(),
            Some(libc::EINVAL),
            "map {limit}: one past max_dma_maps"
        );
        let r = raw.dma_map(None, 0, iova(limit), 4096);
        assert_eq!(
            r.error(),
            Some(libc::EINVAL),
            "fd-less map past max_dma_maps"
        );
        for i in 0..limit {
            assert_eq!(raw.dma_unmap(iova(i), 4096).error(), None, "unmap {i}");
        }
        assert_eq!(
            raw.dma_map(Some(fd.as_fd()), 0, iova(limit), 4096).error(),
            None
        );
        assert_eq!(raw.dma_unmap(iova(limit), 4096).error(), None);
    });
    drop(raw);
    assert_recovers(&s.a);
    s.stop();
}

/// Attack: DMA_UNMAP the region that holds the admin and I/O queues while the controller
/// works through 1000 queued 64 KiB writes (some done, the rest queued or in flight).
/// Expected: the unmap succeeds (it is the client's memory), the daemon lives, the
/// neighbour is clean, controller a is ready or fatal and can be reset (CC.EN = 0 clears
/// CSTS.RDY), then, with its memory mapped again, enabled and used.
#[test]
fn unmapping_the_queues_under_io_is_contained() {
    let s = start("unmap");
    let mut g = Guest::connect(&s.a);
    g.create_io_queues();
    during_neighbour_io(&s.b, || {
        g.queue_writes(1000);
        // unmap once the controller is working through the queue
        let t = Instant::now();
        while g.io_completions().0 == 0 {
            assert!(t.elapsed() < Duration::from_secs(5), "no write completed");
            std::hint::spin_loop();
        }
        assert_eq!(g.raw.dma_unmap(0, GUEST_MEM).error(), None, "DMA_UNMAP");
        let (posted, failed) = g.io_completions();
        eprintln!("at the unmap: {posted} of 1000 writes completed, {failed} failed");
        g.ring(0, 4); // an admin command from memory that is no longer mapped
        std::thread::sleep(Duration::from_millis(100));
        let fatal = assert_ready_or_fatal(&mut g, "after the unmap");
        eprintln!("controller a after the unmap: fatal = {fatal}");
        assert!(
            g.disable(Duration::from_secs(5)),
            "CSTS.RDY stuck after CC.EN = 0"
        );
        assert_eq!(g.remap().error(), None, "DMA_MAP again");
        g.enable();
        assert_eq!(g.identify_serial(), SERIAL_A);
        g.create_io_queues();
        g.queue_writes(10);
        let t = Instant::now();
        while g.io_completions().0 < 10 {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "{:?}",
                g.io_completions()
            );
            std::thread::yield_now();
        }
        assert_eq!(g.io_completions(), (10, 0), "writes after the reset");
    });
    // the server still answers on the attacker's connection
    assert_eq!(g.raw.region_read(BAR0, 0x8, 4)[2], 1, "VS major version");
    drop(g);
    assert_recovers(&s.a);
    s.stop();
}

// ---------------------------------------------------------------------------------------
// A stalled backend: controller a's namespace lives on a separate `vnvme serve` process
// that the test freezes (SIGSTOP) with requests in flight, reached over vfio-user (the
// `nvme:` backend, through the host driver) or NVMe/TCP (the `nvme-tcp://` backend).
// ---------------------------------------------------------------------------------------

/// How controller a reaches its back process.
#[derive(Debug, Clone, Copy)]
enum Remote {
    VfioUser,
    Tcp,
}

const BACK_NQN: &str = "nqn.2026-11.io.vnvme:stalled-back";

/// A `vnvme serve` process with one 64 MiB RAM namespace.
struct BackProcess {
    child: std::process::Child,
}

impl BackProcess {
    /// Start it (on `dir/back.sock`, or a free TCP port on 127.0.0.1) and wait until it
    /// takes connections; returns it and the backend spec that reaches it.
    fn spawn(dir: &Path, remote: Remote) -> (Self, String) {
        let mut cmd = std::process::Command::new(vnvme_binary());
        // one process: freezing it stalls the data plane (a supervisor's worker would go on)
        cmd.args(["serve", "--unsupervised", "--ns", "malloc:64M"]);
        if std::env::var_os("RUST_LOG").is_none() {
            // its log only when asked for, as the in-process daemon's
            cmd.stdout(std::process::Stdio::null());
            cmd.stderr(std::process::Stdio::null());
        }
        let (backend, probe): (String, Box<dyn Fn() -> bool>) = match remote {
            Remote::VfioUser => {
                let sock = dir.join("back.sock");
                cmd.arg("--socket").arg(&sock);
                let backend = format!("nvme:vfio-user:{}", sock.display());
                (
                    backend,
                    Box::new(move || UnixStream::connect(&sock).is_ok()),
                )
            }
            Remote::Tcp => {
                let addr = std::net::TcpListener::bind("127.0.0.1:0")
                    .and_then(|l| l.local_addr())
                    .unwrap();
                cmd.args(["--tcp-listen", &addr.to_string(), "--nqn", BACK_NQN]);
                let backend = format!("nvme-tcp://{addr}/{BACK_NQN}/1");
                let probe = move || std::net::TcpStream::connect(addr).is_ok();
                (backend, Box::new(probe))
            }
        };
        let mut back = BackProcess {
            child: cmd.spawn().expect("vnvme serve"),
        };
        let t = Instant::now();
        while !probe() {
            if let Some(st) = back.child.try_wait().unwrap() {
                panic!("vnvme serve exited: {st}");
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "{backend}: never took a connection"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        (back, backend)
    }

    /// SIGSTOP, and wait until every thread of the process has stopped.
    fn freeze(&self) {
        vnvme_tests::process::freeze(self.child.id());
    }

    fn thaw(&self) {
        vnvme_tests::process::signal(self.child.id(), libc::SIGCONT);
    }
}

impl Drop for BackProcess {
    fn drop(&mut self) {
        self.thaw();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The daemon with controller a's namespace on a fresh back process.
fn start_stalled(tag: &str, remote: Remote) -> Setup {
    let dir = TempDir::new(&format!("hostile-{tag}"));
    let (back, backend) = BackProcess::spawn(dir.path(), remote);
    start_in(dir, &backend, Some(back))
}

impl Setup {
    fn back(&self) -> &BackProcess {
        self.back.as_ref().expect("a back process")
    }
}

/// 16 writes of 4 KiB from [`WRITE_BUF`] and 16 reads of the same blocks into
/// [`SPARE_BUF`] (12 pages, reused), interleaved.
fn mixed_batch() -> Vec<[u8; 64]> {
    (0..16u32)
        .flat_map(|i| {
            let read_to = SPARE_BUF + u64::from(i % 12) * 4096;
            [
                cmd(0x01, 1, WRITE_BUF, &[i * 8, 0, 7]),
                cmd(0x02, 1, read_to, &[i * 8, 0, 7]),
            ]
        })
        .collect()
}

/// `len` bytes of a pattern that never holds 0xee (bytes below 199).
fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(31).wrapping_add(seed) % 199) as u8)
        .collect()
}

/// Guest `g` on controller a: I/O queues, a batch of reads and writes that all succeed
/// (the backend works), then the back process is frozen and a second batch is submitted
/// that stays in flight. The buffers the stalled reads go to hold 0xee.
fn stall_a(s: &Setup, g: &mut Guest) {
    assert_eq!(g.identify_serial(), SERIAL_A);
    g.create_io_queues();
    g.mem_write(WRITE_BUF, &pattern(4096, 7));
    let cids = g.io_submit(&mixed_batch());
    let done = g.io_wait(cids.len(), Duration::from_secs(10));
    assert_eq!(done.len(), cids.len(), "first batch on a: {done:?}");
    assert!(done.iter().all(|&(_, st)| st == 0), "first batch: {done:?}");

    s.back().freeze();
    g.mem_fill(SPARE_BUF, 12 * 4096, 0xee);
    let stalled = g.io_submit(&mixed_batch());
    std::thread::sleep(Duration::from_millis(300));
    let early = g.io_reap();
    assert!(
        early.is_empty(),
        "completions from a frozen backend: {early:?}"
    );
    eprintln!("{} commands in flight on a's frozen backend", stalled.len());
}

/// Neighbour b's verified run of `duration` on its own thread, once its controller is up
/// (within 10 s: bring-up needs the shared reactor).
fn start_neighbour(b: &Path, duration: Duration) -> std::thread::JoinHandle<Report> {
    let (up_tx, up_rx) = std::sync::mpsc::channel();
    let b = b.to_owned();
    let neighbour = std::thread::spawn(move || {
        let mut c = open(&b);
        assert_eq!(c.names().1, SERIAL_B);
        up_tx.send(()).unwrap();
        verified_run(&mut c, duration)
    });
    let t = Instant::now();
    up_rx
        .recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|e| {
            panic!(
                "neighbour b not brought up after {:?} while a's backend is frozen \
                 (the shared reactor is blocked?): {e}",
                t.elapsed()
            )
        });
    eprintln!("neighbour b up in {:?}", t.elapsed());
    neighbour
}

/// The neighbour's run is clean and kept going while a's backend was frozen.
fn assert_neighbour_kept_going(neighbour: std::thread::JoinHandle<Report>) {
    let r = neighbour.join().expect("neighbour thread");
    assert_clean(&r, "neighbour b");
    let t = r.total();
    eprintln!(
        "neighbour b during the stall: {} I/Os in {:?}",
        t.ios, r.elapsed
    );
    assert!(
        t.ios > 1000,
        "neighbour b starved: {t:?} in {:?}",
        r.elapsed
    );
}

/// Every entry of `g`'s I/O CQ from `from` on is untouched.
fn assert_cq_untouched(g: &Guest, from: u32, when: &str) {
    for i in from..IO_QSIZE {
        assert_eq!(
            g.io_cq_entry(i),
            [0; 16],
            "I/O CQ entry {i} of a's new queue posted {when}"
        );
    }
}

/// Verified I/O on `g`'s fresh queues: 8 KiB written at 48 MiB and read back; exactly
/// these two completions appear.
fn verified_io_on_fresh_queues(g: &mut Guest) {
    let data = pattern(8192, 99);
    g.mem_write(DATA_BUF, &data);
    let lba = (48 << 20) / 512;
    let w = g.io_submit(&[with_prp2(
        cmd(0x01, 1, DATA_BUF, &[lba, 0, 15]),
        DATA_BUF + 0x1000,
    )]);
    assert_eq!(g.io_wait(1, Duration::from_secs(10)), [(w[0], 0)], "write");
    g.mem_fill(DATA_BUF + 0x2000, 8192, 0);
    let r = g.io_submit(&[with_prp2(
        cmd(0x02, 1, DATA_BUF + 0x2000, &[lba, 0, 15]),
        DATA_BUF + 0x3000,
    )]);
    assert_eq!(g.io_wait(1, Duration::from_secs(10)), [(r[0], 0)], "read");
    let mut got = vec![0u8; 8192];
    g.mem_read(DATA_BUF + 0x2000, &mut got);
    assert!(got == data, "data read back on a after the reset");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(g.io_reap(), [], "unexpected completions");
    assert_cq_untouched(g, 2, "besides the verified write and read");
}

/// Controller a's backend, a separate vnvme process, freezes (SIGSTOP) with 32 requests in
/// flight, and a's host resets it (CC.EN = 0) while the neighbour runs verified I/O on the
/// shared reactor.
/// Expected: the REGION_WRITE is answered at once (no thread waits for the backend);
/// CSTS.RDY stays 1 while the reset waits for the backend, then clears after the 10 s
/// wait (the requests are retired); the neighbour keeps doing I/O throughout. Once the
/// backend resumes, its late answers land in the memory kept for them (the stalled reads'
/// data arrives) and are dropped: the queues a's host made after the reset get no
/// completion but their own; verified I/O on a works; the daemon stops promptly.
fn reset_while_the_backend_is_stalled(tag: &str, remote: Remote) {
    let s = start_stalled(tag, remote);
    let mut g = Guest::connect(&s.a);
    stall_a(&s, &mut g);

    let neighbour = start_neighbour(&s.b, Duration::from_secs(3));
    let t = Instant::now();
    let id = g.raw.send_region_write(BAR0, REG_CC, &0u32.to_le_bytes());
    g.raw
        .stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let reply = g.raw.try_recv(id);
    let replied = t.elapsed();
    let reply = reply.unwrap_or_else(|e| panic!("no reply to CC.EN = 0 after {replied:?}: {e}"));
    assert_eq!(reply.error(), None, "CC.EN = 0");
    assert!(
        replied < Duration::from_secs(1),
        "CC.EN = 0 answered after {replied:?}"
    );
    g.raw
        .stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let csts = g.csts();
    assert_eq!(
        csts & CSTS_RDY,
        CSTS_RDY,
        "CSTS {csts:#x} right after CC.EN = 0: the reset must wait for the backend"
    );
    while g.csts() & CSTS_RDY != 0 {
        assert!(
            t.elapsed() < Duration::from_secs(13),
            "CSTS.RDY still 1 {:?} after CC.EN = 0",
            t.elapsed()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let cleared = t.elapsed();
    eprintln!("CC.EN = 0 answered in {replied:?}; CSTS.RDY cleared after {cleared:?}");
    assert!(
        cleared >= Duration::from_secs(9),
        "CSTS.RDY cleared after {cleared:?}, before the backend answered or the 10 s wait"
    );
    assert!(
        cleared < Duration::from_secs(12),
        "CSTS.RDY cleared after {cleared:?}"
    );
    assert_neighbour_kept_going(neighbour);

    // new queues on a, the reset epoch moved on: the late answers must not reach them
    g.enable();
    assert_eq!(g.identify_serial(), SERIAL_A);
    g.create_io_queues();
    s.back().thaw();
    let t = Instant::now();
    let mut late = vec![0u8; 12 * 4096];
    loop {
        g.mem_read(SPARE_BUF, &mut late);
        if late.iter().all(|&b| b != 0xee) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "the stalled reads never landed after SIGCONT"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    eprintln!("the stalled reads landed {:?} after SIGCONT", t.elapsed());
    assert!(late == pattern(4096, 7).repeat(12), "the late reads' data");
    std::thread::sleep(Duration::from_millis(500)); // the front reaps the late answers
    assert_cq_untouched(&g, 0, "by the late answers");
    verified_io_on_fresh_queues(&mut g);
    drop(g);
    assert_recovers(&s.a);
    s.stop_within(Duration::from_secs(15));
}

/// As [`reset_while_the_backend_is_stalled`], but a's vfio-user client simply goes away
/// (closes its socket) while the backend is frozen with 32 requests in flight.
/// Expected: the neighbour keeps doing I/O; within about 12 s the server takes a new
/// client on a, which can enable the controller (admin only: the backend is still
/// frozen); once the backend resumes, the late answers are dropped and verified I/O works.
fn client_leaving_while_the_backend_is_stalled(tag: &str, remote: Remote) {
    let s = start_stalled(tag, remote);
    let mut g = Guest::connect(&s.a);
    stall_a(&s, &mut g);

    // the memory the stalled reads go to outlives the client (the daemon keeps it mapped)
    let old_memory = std::fs::File::from(g.memfd.try_clone().unwrap());
    let neighbour = start_neighbour(&s.b, Duration::from_secs(3));
    let t = Instant::now();
    drop(g);
    let mut g = Guest::connect_within(&s.a, Duration::from_secs(15));
    let served = t.elapsed();
    eprintln!("a new client on a served {served:?} after the last one left");
    assert!(
        served < Duration::from_secs(12),
        "new client served after {served:?}"
    );
    assert_eq!(g.identify_serial(), SERIAL_A);
    assert_neighbour_kept_going(neighbour);

    g.create_io_queues();
    s.back().thaw();
    // the late answers come and are dropped. Over NVMe/TCP the stalled reads' data lands
    // in the departed client's memory (kept mapped for them); a vfio-user backend was told
    // to unmap that memory at the reset, so its late reads may fail instead.
    let t = Instant::now();
    let mut late = vec![0u8; 12 * 4096];
    let expected = pattern(4096, 7).repeat(12);
    let landed = loop {
        std::os::unix::fs::FileExt::read_exact_at(&old_memory, &mut late, SPARE_BUF).unwrap();
        if late == expected || t.elapsed() > Duration::from_secs(5) {
            break late == expected;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    eprintln!(
        "the stalled reads {} {:?} after SIGCONT",
        if landed { "landed" } else { "had not landed" },
        t.elapsed()
    );
    if matches!(remote, Remote::Tcp) {
        assert!(landed, "the stalled reads never landed after SIGCONT");
    }
    std::thread::sleep(Duration::from_millis(500)); // the front reaps the late answers
    assert_cq_untouched(&g, 0, "by the late answers");
    verified_io_on_fresh_queues(&mut g);
    drop(g);
    assert_recovers(&s.a);
    s.stop_within(Duration::from_secs(15));
}

#[test]
fn a_reset_while_a_vfio_user_backend_is_stalled_neither_blocks_the_reactor_nor_leaks_completions() {
    reset_while_the_backend_is_stalled("stall-reset-vu", Remote::VfioUser);
}

#[test]
fn a_reset_while_an_nvme_tcp_backend_is_stalled_neither_blocks_the_reactor_nor_leaks_completions() {
    reset_while_the_backend_is_stalled("stall-reset-tcp", Remote::Tcp);
}

#[test]
fn a_client_leaving_while_a_vfio_user_backend_is_stalled_frees_the_controller_for_the_next() {
    client_leaving_while_the_backend_is_stalled("stall-leave-vu", Remote::VfioUser);
}

#[test]
fn a_client_leaving_while_an_nvme_tcp_backend_is_stalled_frees_the_controller_for_the_next() {
    client_leaving_while_the_backend_is_stalled("stall-leave-tcp", Remote::Tcp);
}

/// Read 8 blocks at `lba` of a's namespace 1 into `DATA_BUF + 0x3000`; returns them.
fn read_back(g: &mut Guest, lba: u32) -> Vec<u8> {
    g.mem_fill(DATA_BUF + 0x3000, 4096, 0xee);
    let r = g.io_submit(&[cmd(0x02, 1, DATA_BUF + 0x3000, &[lba, 0, 7])]);
    assert_eq!(
        g.io_wait(1, Duration::from_secs(10)),
        [(r[0], 0)],
        "read of LBA {lba}"
    );
    let mut got = vec![0u8; 4096];
    g.mem_read(DATA_BUF + 0x3000, &mut got);
    got
}

/// Controller a's backend, a separate vnvme process, is frozen (SIGSTOP) while a's host
/// issues the commands that used to run synchronously on the reactor: Flush of every
/// namespace (NSID FFFFFFFFh) and of namespace 1, Dataset Management deallocating two
/// ranges, a Compare that matches and one that does not; then, frozen again, Format NVM.
/// Expected: meanwhile neighbour b (same reactor) comes up and runs verified I/O without an
/// error, and none of a's commands completes; after SIGCONT each completes with its status
/// (Compare Failure for the Compare that differs), the deallocated ranges read as zeroes
/// and the rest as written, and after the Format the whole namespace reads as zeroes.
fn long_commands_while_the_backend_is_stalled(tag: &str, remote: Remote) {
    let s = start_stalled(tag, remote);
    let mut g = Guest::connect(&s.a);
    assert_eq!(g.identify_serial(), SERIAL_A);
    g.create_io_queues();
    // a pattern at LBAs 0, 64 and 128 (8 blocks of 512 bytes each)
    let data = pattern(4096, 3);
    g.mem_write(DATA_BUF, &data);
    let w = g.io_submit(&[0, 64, 128].map(|lba| cmd(0x01, 1, DATA_BUF, &[lba, 0, 7])));
    // (completions come in any order: NVMe does not order commands of a queue)
    let mut done = g.io_wait(3, Duration::from_secs(10));
    done.sort_unstable();
    let mut want: Vec<(u16, u16)> = w.iter().map(|&c| (c, 0)).collect();
    want.sort_unstable();
    assert_eq!(done, want, "writes");
    // the same pattern with one bit changed in its last block, for a Compare that fails
    let mut other = data.clone();
    other[4095] ^= 1;
    g.mem_write(DATA_BUF + 0x1000, &other);
    // Dataset Management ranges (context attributes, blocks, starting LBA): 64 and 128
    let mut ranges = Vec::new();
    for lba in [64u64, 128] {
        ranges.extend_from_slice(&0u32.to_le_bytes());
        ranges.extend_from_slice(&8u32.to_le_bytes());
        ranges.extend_from_slice(&lba.to_le_bytes());
    }
    g.mem_write(DATA_BUF + 0x2000, &ranges);

    s.back().freeze();
    let cids = g.io_submit(&[
        cmd(0x00, u32::MAX, 0, &[]),                   // Flush, every namespace
        cmd(0x00, 1, 0, &[]),                          // Flush, namespace 1
        cmd(0x09, 1, DATA_BUF + 0x2000, &[1, 1 << 2]), // DSM: 2 ranges, deallocate
        cmd(0x05, 1, DATA_BUF, &[0, 0, 7]),            // Compare: equal
        cmd(0x05, 1, DATA_BUF + 0x1000, &[0, 0, 7]),   // Compare: one bit differs
    ]);
    let neighbour = start_neighbour(&s.b, Duration::from_secs(2));
    let report = neighbour.join().expect("neighbour thread");
    assert_clean(
        &report,
        "neighbour b while a's I/O commands wait on the frozen backend",
    );
    eprintln!(
        "neighbour b: {:?} while a's backend was frozen",
        report.total()
    );
    assert_eq!(g.io_reap(), [], "completions from a frozen backend");
    s.back().thaw();
    let mut done = g.io_wait(cids.len(), Duration::from_secs(15));
    done.sort_unstable();
    let compare_failure = nvme_spec::Status::COMPARE_FAILURE.raw();
    let expected: Vec<(u16, u16)> = cids
        .iter()
        .zip([0, 0, 0, 0, compare_failure])
        .map(|(&c, st)| (c, st))
        .collect();
    assert_eq!(done, expected, "statuses after SIGCONT (cid, status)");
    assert!(read_back(&mut g, 0) == data, "LBA 0 kept its data");
    assert!(
        read_back(&mut g, 64).iter().all(|&b| b == 0),
        "LBA 64 deallocated"
    );
    assert!(
        read_back(&mut g, 128).iter().all(|&b| b == 0),
        "LBA 128 deallocated"
    );

    s.back().freeze();
    let format = g.admin_nowait(cmd(0x80, 1, 0, &[0])); // LBA format 0, no secure erase
    let neighbour = start_neighbour(&s.b, Duration::from_secs(2));
    let report = neighbour.join().expect("neighbour thread");
    assert_clean(
        &report,
        "neighbour b while a's Format NVM waits on the frozen backend",
    );
    eprintln!(
        "neighbour b: {:?} while a's backend was frozen",
        report.total()
    );
    assert_eq!(
        g.admin_wait(format, Duration::ZERO),
        None,
        "Format NVM completed on a frozen backend"
    );
    s.back().thaw();
    let c = g
        .admin_wait(format, Duration::from_secs(15))
        .expect("Format NVM completes after SIGCONT");
    assert!(c.ok(), "Format NVM: {c:?}");
    assert!(
        read_back(&mut g, 0).iter().all(|&b| b == 0),
        "LBA 0 formatted"
    );
    drop(g);
    assert_recovers(&s.a);
    s.stop_within(Duration::from_secs(15));
}

#[test]
fn flush_dsm_compare_and_format_on_a_stalled_nvme_tcp_backend_leave_the_reactor_to_the_neighbour() {
    long_commands_while_the_backend_is_stalled("stall-long-tcp", Remote::Tcp);
}

#[test]
fn flush_dsm_compare_and_format_on_a_stalled_vfio_user_backend_leave_the_reactor_to_the_neighbour()
{
    long_commands_while_the_backend_is_stalled("stall-long-vu", Remote::VfioUser);
}

/// Garbage reads and writes on controller a, whose namespace is an `nvme:` backend (another
/// vnvme process over vfio-user: the backend's one-segment zero-copy start and its general
/// path): blocks past the end, a data pointer outside the guest's memory, a PRP that is not
/// dword aligned, a length past MDTS. Each gets the status the NVM command set names and
/// reaches no memory outside the guest's; then reads and writes of one and of two pages on
/// a come back intact, and the neighbour's verified run on the shared reactor is clean
/// throughout.
#[test]
fn garbage_reads_and_writes_through_an_nvme_backend_get_their_statuses() {
    let s = start_stalled("nvme-garbage", Remote::VfioUser);
    let mut g = Guest::connect(&s.a);
    during_neighbour_io(&s.b, || {
        g.create_io_queues();
        let blocks = (64u32 << 20) / 512; // the back's malloc:64M
        let garbage = [
            // one block past the end; two blocks over the end
            (
                cmd(0x02, 1, DATA_BUF, &[blocks, 0, 0]),
                0x80,
                "read past the end",
            ),
            (
                cmd(0x01, 1, DATA_BUF, &[blocks - 1, 0, 1]),
                0x80,
                "write over the end",
            ),
            // data outside the guest's memory
            (
                cmd(0x02, 1, GUEST_MEM + 0x10_0000, &[0, 0, 7]),
                0x04,
                "read outside memory",
            ),
            (
                cmd(0x01, 1, GUEST_MEM + 0x10_0000, &[0, 0, 7]),
                0x04,
                "write outside memory",
            ),
            // PRP1 not dword aligned
            (
                cmd(0x02, 1, DATA_BUF + 1, &[0, 0, 7]),
                0x13,
                "misaligned PRP",
            ),
            // 32 MiB, past MDTS
            (cmd(0x02, 1, DATA_BUF, &[0, 0, 0xffff]), 0x02, "past MDTS"),
        ];
        let sqes: Vec<[u8; 64]> = garbage.iter().map(|g| g.0).collect();
        let cids = g.io_submit(&sqes);
        let mut done = g.io_wait(cids.len(), Duration::from_secs(10));
        assert_eq!(done.len(), cids.len(), "garbage answered: {done:?}");
        done.sort_by_key(|&(cid, _)| cids.iter().position(|&c| c == cid));
        for ((_, want, what), &(_, status)) in garbage.iter().zip(&done) {
            assert_eq!(status & 0x7ff, *want, "{what}: status {status:#x}");
        }

        // one page (the one-segment start) and two pages, written and read back
        for (lba, pages) in [(8u32, 1u64), (64, 2)] {
            let len = (pages * 4096) as usize;
            let data = pattern(len, lba);
            g.mem_write(DATA_BUF, &data);
            let nlb = u32::try_from(len / 512 - 1).unwrap();
            let w = with_prp2(cmd(0x01, 1, DATA_BUF, &[lba, 0, nlb]), DATA_BUF + 0x1000);
            let w = g.io_submit(&[w]);
            assert_eq!(g.io_wait(1, Duration::from_secs(10)), [(w[0], 0)], "write");
            g.mem_fill(DATA_BUF + 0x2000, len, 0);
            let r = with_prp2(
                cmd(0x02, 1, DATA_BUF + 0x2000, &[lba, 0, nlb]),
                DATA_BUF + 0x3000,
            );
            let r = g.io_submit(&[r]);
            assert_eq!(g.io_wait(1, Duration::from_secs(10)), [(r[0], 0)], "read");
            let mut got = vec![0u8; len];
            g.mem_read(DATA_BUF + 0x2000, &mut got);
            assert!(got == data, "{pages} page(s) at LBA {lba} read back");
        }
    });
    s.stop_within(Duration::from_secs(15));
}

/// Wait until `n` I/O completions are posted on `g`'s queue, at most `limit`.
fn wait_io_completions(g: &Guest, n: u32, limit: Duration, what: &str) {
    let t = Instant::now();
    while g.io_completions().0 < n {
        assert!(
            t.elapsed() < limit,
            "{what}: {:?} (posted, failed) of {n} completions",
            g.io_completions()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A queue deeper than a remote backend's (the `nvme:` backend's queue pair holds 255
/// commands): 1000 64 KiB writes queued at once all succeed, the backend holding in order
/// what it cannot send yet (before, every command past its depth failed at once with
/// Internal Error, and a guest at queue depth 512 saw millions of them). Over vfio-user
/// and NVMe/TCP, with the neighbour's verified I/O running meanwhile.
#[test]
fn a_queue_deeper_than_a_remote_backend_is_held_not_failed() {
    for remote in [Remote::VfioUser, Remote::Tcp] {
        let s = start_stalled(&format!("deep-{remote:?}"), remote);
        let mut g = Guest::connect(&s.a);
        g.create_io_queues();
        during_neighbour_io(&s.b, || {
            g.queue_writes(1000);
            wait_io_completions(&g, 1000, Duration::from_secs(30), &format!("{remote:?}"));
        });
        assert_eq!(
            g.io_completions(),
            (1000, 0),
            "{remote:?}: (posted, failed)"
        );
        drop(g);
        s.stop();
    }
}

/// The same deep queue against a back process frozen (SIGSTOP) before the writes: its queue
/// pair takes 255 of them and the rest wait for a slot, but not past half the front's reset
/// wait, so that none can start after the front gave up on it. Expected: those fail with a
/// retryable path error (Internal Path Error, SCT 3h, DNR clear) within 15 s, nothing fails
/// with another status, the neighbour's verified I/O runs clean meanwhile, every write
/// completes after SIGCONT, and the controller serves its next client.
#[test]
fn a_deep_queue_on_a_frozen_backend_fails_retryably_after_its_wait() {
    let s = start_stalled("deep-frozen", Remote::VfioUser);
    let mut g = Guest::connect(&s.a);
    g.create_io_queues();
    s.back().freeze();
    during_neighbour_io(&s.b, || {
        g.queue_writes(1000);
        let t = Instant::now();
        wait_io_completions(
            &g,
            1000 - 255,
            Duration::from_secs(15),
            "on the frozen back",
        );
        eprintln!(
            "{:?} (posted, failed) after {:?} frozen",
            g.io_completions(),
            t.elapsed()
        );
    });
    let path_error = |st: u16| st & 0x7ff == 3 << 8 && st & 0x8000 == 0;
    let statuses = g.io_statuses();
    assert!(
        statuses.iter().all(|&st| path_error(st)),
        "statuses while frozen: {:?}",
        statuses
            .iter()
            .filter(|&&st| !path_error(st))
            .collect::<Vec<_>>()
    );
    s.back().thaw();
    wait_io_completions(&g, 1000, Duration::from_secs(20), "after SIGCONT");
    let statuses = g.io_statuses();
    assert!(
        statuses.iter().all(|&st| st == 0 || path_error(st)),
        "statuses after SIGCONT: {:?}",
        statuses
            .iter()
            .filter(|&&st| st != 0 && !path_error(st))
            .collect::<Vec<_>>()
    );
    drop(g);
    assert_recovers(&s.a);
    s.stop_within(Duration::from_secs(15));
}
