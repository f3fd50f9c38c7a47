//! Host-side tests (no VM): rust-vmm's independent vfio-user client drives the daemon's
//! controller over shared memory, then feeds it malicious commands and malformed vfio-user
//! messages. Each bad input must get the spec's error and leave the daemon serving.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use std::time::Duration;
use vnvme::config::Config;
use vnvme::daemon::Daemon;

use vnvme_tests::nvme_client::{
    Cqe, MEM, NvmeClient, RingMode, cmd, msix_eventfd, take_interrupts, wait_interrupts, with_prp2,
};

fn daemon(tag: &str) -> (Daemon, PathBuf, PathBuf) {
    daemon_with(tag, None)
}

fn daemon_with(tag: &str, irq_coalescing: Option<&str>) -> (Daemon, PathBuf, PathBuf) {
    let _ = env_logger::builder().is_test(true).try_init();
    let dir = std::env::temp_dir().join(format!("vnvme-host-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("c.sock");
    let cfg = Config::from_flags(
        vnvme::config::Served::socket(sock.clone()),
        &["malloc:64M".into()],
        Some("HOSTTEST".into()),
        512,
        vnvme::config::PollSetting::Adaptive,
    )
    .unwrap();
    let mut cfg = cfg;
    cfg.controllers[0].irq_coalescing = irq_coalescing.map(String::from);
    cfg.validate().unwrap();
    (Daemon::start(&cfg).unwrap(), sock, dir)
}

const SC_INVALID_FIELD: u16 = 0x02;
const SC_DATA_TRANSFER: u16 = 0x04;
const SC_INVALID_NS: u16 = 0x0b;
const SC_LBA_RANGE: u16 = 0x80;
const SCT_CMD: u16 = 1 << 8;

fn sc(c: Cqe) -> u16 {
    c.status & 0x7ff
}

#[test]
fn admin_and_io_over_shared_memory_and_malicious_commands() {
    let (d, sock, dir) = daemon("io");
    let mut n = NvmeClient::connect(&sock);

    // Identify controller into 0x10000.
    let c = n.submit(0, cmd(0x06, 0, 0x10000, &[1]));
    assert!(c.ok(), "{c:?}");
    let mut id = [0u8; 4096];
    n.mem_read(0x10000, &mut id);
    assert_eq!(&id[4..12], b"HOSTTEST");
    assert_eq!(id[512], 0x66, "SQES");

    n.create_io_queues();
    // Write 8 blocks of a pattern, read them back elsewhere, compare.
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 13 % 251) as u8).collect();
    n.mem_write(0x20000, &pattern);
    assert!(
        n.submit(1, cmd(0x01, 1, 0x20000, &[100, 0, 7])).ok(),
        "write"
    );
    n.mem_fill(0x30000, 4096, 0);
    assert!(
        n.submit(1, cmd(0x02, 1, 0x30000, &[100, 0, 7])).ok(),
        "read"
    );
    let mut back = vec![0u8; 4096];
    n.mem_read(0x30000, &mut back);
    assert_eq!(back, pattern);
    // Compare: equal succeeds, different data fails with Compare Failure (SCT 2, SC 85h).
    assert!(n.submit(1, cmd(0x05, 1, 0x30000, &[100, 0, 7])).ok());
    n.mem_fill(0x30000, 1, 0xff);
    assert_eq!(
        sc(n.submit(1, cmd(0x05, 1, 0x30000, &[100, 0, 7]))),
        (2 << 8) | 0x85
    );

    // Malicious commands, each with its spec status; the queue keeps working after each.
    let bad = [
        (
            "PRP outside guest memory",
            cmd(0x02, 1, 64 << 20, &[0, 0, 0]),
            SC_DATA_TRANSFER,
        ),
        (
            "PRP list outside guest memory",
            with_prp2(cmd(0x02, 1, 0x20000, &[0, 0, 15]), 1 << 40),
            SC_DATA_TRANSFER,
        ),
        (
            "LBA past the end",
            cmd(0x02, 1, 0x20000, &[u32::MAX, 0, 0]),
            SC_LBA_RANGE,
        ),
        (
            "transfer above MDTS",
            cmd(0x02, 1, 0x20000, &[0, 0, 0xffff]),
            SC_INVALID_FIELD,
        ),
        (
            "absent namespace",
            cmd(0x02, 7, 0x20000, &[0, 0, 0]),
            SC_INVALID_NS,
        ),
        ("unknown opcode", cmd(0x7f, 1, 0, &[]), 0x01),
    ];
    for (what, sqe, want) in bad {
        let c = n.submit(1, sqe);
        assert_eq!(sc(c), want, "{what}: {c:?}");
        assert!(
            c.status & (1 << 14) != 0 || want == SC_DATA_TRANSFER,
            "{what}: DNR expected"
        );
    }
    // Admin: queue ids and sizes out of range.
    assert_eq!(
        sc(n.submit(0, cmd(0x05, 0, 0x4000, &[(63 << 16), 1]))),
        SCT_CMD | 0x01,
        "create CQ 0"
    );
    assert_eq!(
        sc(n.submit(0, cmd(0x05, 0, 0x4000, &[(63 << 16) | 0xc8, 1]))),
        SCT_CMD | 0x01,
        "create CQ 200"
    );
    assert_eq!(
        sc(n.submit(0, cmd(0x05, 0, 0x4000, &[(5000 << 16) | 2, 1]))),
        SCT_CMD | 0x02,
        "CQ too big"
    );
    assert_eq!(
        sc(n.submit(0, cmd(0x05, 0, 0x4000, &[(63 << 16) | 1, 1]))),
        SCT_CMD | 0x01,
        "CQ 1 exists"
    );
    assert_eq!(
        sc(n.submit(0, cmd(0x01, 0, 0x4000, &[(63 << 16) | 2, (9 << 16) | 1]))),
        SCT_CMD | 0x01,
        "SQ on a CQID beyond those allocated: Invalid Queue Identifier"
    );
    assert_eq!(
        sc(n.submit(0, cmd(0x05, 0, 0x4000, &[(63 << 16) | 2, 1 | (300 << 16)]))),
        SCT_CMD | 0x08,
        "bad vector"
    );
    assert_eq!(
        sc(n.submit(0, cmd(0x04, 0, 0, &[1]))),
        SCT_CMD | 0x0c,
        "delete CQ with SQ"
    );
    assert_eq!(
        sc(n.submit(0, cmd(0x0a, 0, 0, &[0xc0]))),
        SC_INVALID_FIELD,
        "unknown feature"
    );
    assert_eq!(
        sc(n.submit(0, cmd(0x02, 0, 0x10000, &[0x00ff_0077]))),
        SCT_CMD | 0x09,
        "unknown log page"
    );
    let mut fused = cmd(0x06, 0, 0x10000, &[1]);
    fused[1] = 1;
    assert_eq!(sc(n.submit(0, fused)), SC_INVALID_FIELD, "fused admin");

    // Doorbell past the queue size: ignored, the controller keeps serving.
    n.ring_register(2, 1000);
    n.ring_register(3, 1000);
    std::thread::sleep(std::time::Duration::from_millis(50));
    n.ring_register(2, 0); // back to a valid value (our tail is still where it was)
    let tail_fix = n.submit(0, cmd(0x06, 0, 0x10000, &[1]));
    assert!(tail_fix.ok(), "admin still works after bad doorbells");

    // Controller reset under the same client, then I/O again.
    n.enable();
    n.create_io_queues();
    assert!(
        n.submit(1, cmd(0x02, 1, 0x30000, &[100, 0, 7])).ok(),
        "read after reset"
    );
    n.mem_read(0x30000, &mut back);
    assert_eq!(back, pattern, "data kept across controller reset");
    drop(n);
    d.stop().unwrap();
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn shadow_doorbells_async_events_and_keep_alive() {
    let (d, sock, dir) = daemon("dbbuf");
    let mut n = NvmeClient::connect(&sock);
    let id = n.submit(0, cmd(0x06, 0, 0x10000, &[1]));
    assert!(id.ok());
    let mut page = [0u8; 4096];
    n.mem_read(0x10000, &mut page);
    let oacs = u16::from_le_bytes([page[256], page[257]]);
    assert_ne!(oacs & (1 << 8), 0, "OACS advertises Doorbell Buffer Config");

    // Bad buffers: unaligned, same page twice, outside guest memory.
    let bad = [(0x6004, 0x7000), (0x6000, 0x6000), (MEM, MEM + 0x1000)];
    for (shadow, ei) in bad {
        let c = n.submit(0, with_prp2(cmd(0x7c, 0, shadow, &[]), ei));
        assert_eq!(sc(c), SC_INVALID_FIELD, "DBBUF {shadow:#x}/{ei:#x}");
    }

    // Configure, then ring through the shadow page only: admin and I/O keep working.
    assert!(n.configure_shadow_doorbells(0x6000).ok());
    assert_eq!(
        n.shadow_value(0),
        5,
        "admin SQ tail (5 commands so far) copied into the shadow page"
    );
    n.ring_mode = RingMode::ShadowOnly;
    assert!(
        n.submit(0, cmd(0x06, 0, 0x10000, &[1])).ok(),
        "admin via shadow"
    );
    n.create_io_queues();
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 253) as u8).collect();
    n.mem_write(0x20000, &pattern);
    for round in 0..70u32 {
        // more than one trip around the 64-entry queues
        let c = n.submit(1, cmd(0x01, 1, 0x20000, &[round * 8, 0, 7]));
        assert!(c.ok(), "write {round} via shadow: {c:?}");
    }
    let mut back = vec![0u8; 4096];
    assert!(n.submit(1, cmd(0x02, 1, 0x30000, &[69 * 8, 0, 7])).ok());
    n.mem_read(0x30000, &mut back);
    assert_eq!(back, pattern);
    let tail = n.shadow_value(2);
    assert_eq!(
        n.event_idx(2),
        tail.wrapping_sub(1),
        "EventIdx trails the consumed SQ tail: the host need not ring the register"
    );
    // A host that rings only the register (Linux does so for the admin queue) is served too.
    n.ring_mode = RingMode::RegisterOnly;
    for _ in 0..3 {
        assert!(
            n.submit(0, cmd(0x06, 0, 0x10000, &[1])).ok(),
            "admin via register"
        );
    }
    n.ring_mode = RingMode::Auto;

    // Asynchronous event: an invalid doorbell value completes a parked request.
    let aer = n.submit_nowait(0, cmd(0x0c, 0, 0, &[]));
    n.ring_register(2, 1000);
    let ev = n
        .wait(0, aer, Duration::from_secs(5))
        .expect("AER completes");
    assert!(ev.ok());
    assert_eq!(
        ev.dw0, 0x0001_0100,
        "error event, invalid doorbell value, log page 01h"
    );
    n.ring_register(2, n.shadow_value(2));
    assert!(
        n.submit(1, cmd(0x02, 1, 0x30000, &[0, 0, 0])).ok(),
        "I/O after"
    );
    // More than AERL + 1 requests: the fifth is refused.
    let parked: Vec<u16> = (0..4)
        .map(|_| n.submit_nowait(0, cmd(0x0c, 0, 0, &[])))
        .collect();
    let fifth = n.submit(0, cmd(0x0c, 0, 0, &[]));
    assert_eq!(
        sc(fifth),
        SCT_CMD | 0x05,
        "Asynchronous Event Request Limit Exceeded"
    );
    assert_eq!(parked.len(), 4);

    // Keep Alive: KATO rounds up to 100 ms; Keep Alive commands keep the controller alive,
    // silence makes it fatal.
    assert!(n.submit(0, cmd(0x09, 0, 0, &[0x0f, 150])).ok());
    assert_eq!(
        n.submit(0, cmd(0x0a, 0, 0, &[0x0f])).dw0,
        200,
        "KATO granularity"
    );
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(50));
        assert!(n.submit(0, cmd(0x18, 0, 0, &[])).ok(), "keep alive");
    }
    assert_eq!(n.reg_read32(0x1c) & 2, 0, "not fatal while kept alive");
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        n.reg_read32(0x1c) & 2,
        2,
        "CSTS.CFS after the keep alive timer expired"
    );

    // A controller reset clears it all: a stale shadow value must not be taken as a tail.
    n.enable();
    assert_eq!(n.reg_read32(0x1c) & 3, 1, "ready, not fatal");
    n.mem_write(0x6000, &7u32.to_le_bytes());
    assert!(
        n.submit(0, cmd(0x06, 0, 0x10000, &[1])).ok(),
        "shadow off after reset"
    );
    n.create_io_queues();
    assert!(n.submit(1, cmd(0x02, 1, 0x30000, &[69 * 8, 0, 7])).ok());
    n.mem_read(0x30000, &mut back);
    assert_eq!(back, pattern, "data kept");
    drop(n);
    d.stop().unwrap();
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn interrupt_coalescing_holds_msix_until_threshold_or_time() {
    let (d, sock, dir) = daemon_with("coalesce", Some("off"));
    let mut n = NvmeClient::connect(&sock);
    let irq = msix_eventfd(&mut n.client, 1);
    n.create_io_queues_with_irq(Some(1));
    let read = |n: &mut NvmeClient| n.submit_nowait(1, cmd(0x02, 1, 0x30000, &[0, 0, 0]));
    let second = Duration::from_secs(1);

    // Off (configured so): every completion interrupts.
    let cid = read(&mut n);
    assert_eq!(wait_interrupts(&irq, second), 1, "no coalescing when off");
    assert!(n.wait(1, cid, second).is_some_and(|c| c.ok()));

    // 4 entries or 25.5 ms: three completions are posted without an interrupt, the fourth
    // fires it.
    assert!(n.submit(0, cmd(0x09, 0, 0, &[0x08, 0xff03])).ok());
    assert_eq!(n.submit(0, cmd(0x0a, 0, 0, &[0x08])).dw0, 0xff03);
    let mut cids: Vec<u16> = (0..3).map(|_| read(&mut n)).collect();
    assert!(n.wait_posted(1, 3, second));
    assert_eq!(take_interrupts(&irq), 0, "held below the threshold");
    cids.push(read(&mut n));
    assert_eq!(wait_interrupts(&irq, second), 1, "threshold reached");
    for c in cids {
        assert!(n.wait(1, c, second).is_some_and(|c| c.ok()));
    }

    // 256 entries or 100 us: a lone completion still interrupts, about 100 us later.
    assert!(n.submit(0, cmd(0x09, 0, 0, &[0x08, 0x01ff])).ok());
    let t = std::time::Instant::now();
    let cid = read(&mut n);
    assert_eq!(wait_interrupts(&irq, second), 1, "time limit");
    assert!(
        t.elapsed() >= Duration::from_micros(100),
        "{:?}",
        t.elapsed()
    );
    assert!(n.wait(1, cid, second).is_some_and(|c| c.ok()));

    // Coalescing Disable on the vector (feature 09h): immediate again.
    assert!(n.submit(0, cmd(0x09, 0, 0, &[0x08, 0xff03])).ok());
    assert!(n.submit(0, cmd(0x09, 0, 0, &[0x09, (1 << 16) | 1])).ok());
    let cid = read(&mut n);
    assert_eq!(wait_interrupts(&irq, second), 1, "vector opted out");
    assert!(n.wait(1, cid, second).is_some_and(|c| c.ok()));
    drop(n);
    d.stop().unwrap();
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn coalescing_is_on_by_default_and_a_lone_command_still_interrupts_at_once() {
    let (d, sock, dir) = daemon("default-coalescing");
    let mut n = NvmeClient::connect(&sock);
    let irq = msix_eventfd(&mut n.client, 1);
    n.create_io_queues_with_irq(Some(1));
    // 16 entries (0's based 15) or 200 us (2 x 100 us): current and default values
    assert_eq!(n.submit(0, cmd(0x0a, 0, 0, &[0x08])).dw0, 0x020f);
    assert_eq!(n.submit(0, cmd(0x0a, 0, 0, &[0x08 | (1 << 8)])).dw0, 0x020f);
    let second = Duration::from_secs(1);
    for _ in 0..3 {
        let t = std::time::Instant::now();
        let c = n.submit_nowait(1, cmd(0x02, 1, 0x30000, &[0, 0, 0]));
        assert_eq!(wait_interrupts(&irq, second), 1, "QD1: the interrupt comes");
        assert!(t.elapsed() < Duration::from_millis(20), "{:?}", t.elapsed());
        assert!(n.wait(1, c, second).is_some_and(|c| c.ok()));
    }
    drop(n);
    d.stop().unwrap();
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn daemon_coalescing_is_adaptive_a_lone_command_interrupts_at_once() {
    // 256 entries or 25.5 ms, set by the daemon, not by the host
    let (d, sock, dir) = daemon_with("adaptive", Some("256/25500"));
    let mut n = NvmeClient::connect(&sock);
    let irq = msix_eventfd(&mut n.client, 1);
    n.create_io_queues_with_irq(Some(1));
    assert_eq!(
        n.submit(0, cmd(0x0a, 0, 0, &[0x08])).dw0,
        0xffff,
        "power-on value"
    );
    let second = Duration::from_secs(1);
    // QD1: the host waits for this completion; no hold.
    let t = std::time::Instant::now();
    let first = n.submit_nowait(1, cmd(0x02, 1, 0x30000, &[0, 0, 0]));
    assert_eq!(wait_interrupts(&irq, second), 1);
    assert!(t.elapsed() < Duration::from_millis(20), "{:?}", t.elapsed());
    // A second command while the first completion is unconsumed: two outstanding, held
    // until the time limit.
    let second_cmd = n.submit_nowait(1, cmd(0x02, 1, 0x30000, &[0, 0, 0]));
    assert!(n.wait_posted(1, 2, second));
    assert_eq!(take_interrupts(&irq), 0, "streaming host: interrupt held");
    assert_eq!(
        wait_interrupts(&irq, second),
        1,
        "released by the time limit"
    );
    for c in [first, second_cmd] {
        assert!(n.wait(1, c, second).is_some_and(|c| c.ok()));
    }
    drop(n);
    d.stop().unwrap();
    std::fs::remove_dir_all(dir).ok();
}

/// Send a raw message; return the reply header fields (flags, errno) and payload.
fn raw(
    s: &mut UnixStream,
    id: u16,
    command: u16,
    payload: &[u8],
    size_override: Option<u32>,
) -> (u32, u32, Vec<u8>) {
    let size = size_override.unwrap_or(16 + payload.len() as u32);
    let mut m = Vec::new();
    m.extend_from_slice(&id.to_le_bytes());
    m.extend_from_slice(&command.to_le_bytes());
    m.extend_from_slice(&size.to_le_bytes());
    m.extend_from_slice(&0u32.to_le_bytes());
    m.extend_from_slice(&0u32.to_le_bytes());
    m.extend_from_slice(payload);
    s.write_all(&m).unwrap();
    read_reply(s, id)
}

fn read_reply(s: &mut UnixStream, id: u16) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).unwrap();
    assert_eq!(
        u16::from_le_bytes([h[0], h[1]]),
        id,
        "reply for the wrong message"
    );
    let size = u32::from_le_bytes(h[4..8].try_into().unwrap()) as usize;
    let mut body = vec![0u8; size - 16];
    s.read_exact(&mut body).unwrap();
    (
        u32::from_le_bytes(h[8..12].try_into().unwrap()),
        u32::from_le_bytes(h[12..16].try_into().unwrap()),
        body,
    )
}

fn region_read(
    s: &mut UnixStream,
    id: u16,
    region: u32,
    off: u64,
    count: u32,
) -> (u32, u32, Vec<u8>) {
    let mut p = off.to_le_bytes().to_vec();
    p.extend_from_slice(&region.to_le_bytes());
    p.extend_from_slice(&count.to_le_bytes());
    raw(s, id, 9, &p, None)
}

fn connect_raw(sock: &Path) -> UnixStream {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut v = vec![0, 0, 0, 0];
    v.extend_from_slice(b"{}\0");
    let (fl, err, body) = raw(&mut s, 0, 1, &v, None);
    assert_eq!((fl & 0x2f, err), (1, 0), "VERSION reply");
    assert!(String::from_utf8_lossy(&body[4..]).contains("max_msg_fds"));
    s
}

#[test]
fn malformed_vfio_user_messages_get_errors_and_the_server_keeps_serving() {
    let (d, sock, dir) = daemon("garbage");
    let mut s = connect_raw(&sock);
    const ERR: u32 = 1 << 5;
    // (what, command, payload, size override, errno)
    /// (what, command, payload, message size override, expected errno)
    type Case = (&'static str, u16, Vec<u8>, Option<u32>, i32);
    let cases: Vec<Case> = vec![
        ("size below header", 4, vec![], Some(8), libc::EINVAL),
        (
            "oversized message",
            10,
            vec![0u8; 64],
            Some(3 << 20),
            libc::E2BIG,
        ),
        ("unknown command", 77, vec![], None, libc::ENOTSUP),
        ("truncated DMA_MAP", 2, vec![0u8; 10], None, libc::EINVAL),
        (
            "GET_REGION_INFO bad index",
            5,
            [32u32, 0, 42, 0, 0, 0, 0, 0]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            None,
            libc::EINVAL,
        ),
        (
            "GET_IRQ_INFO bad index",
            7,
            [16u32, 0, 9, 0]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            None,
            libc::EINVAL,
        ),
        (
            "SET_IRQS two actions",
            8,
            [20u32, 0b10_1001, 2, 0, 1]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            None,
            libc::EINVAL,
        ),
        (
            "SET_IRQS past the vectors",
            8,
            [20u32, 0b10_0100, 2, 500, 1]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            None,
            libc::EINVAL,
        ),
        (
            "DMA_UNMAP of nothing",
            3,
            [24u32, 0]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .chain(0x1000u64.to_le_bytes())
                .chain(0x1000u64.to_le_bytes())
                .collect(),
            None,
            libc::EINVAL,
        ),
    ];
    for (i, (what, command, payload, size, errno)) in cases.into_iter().enumerate() {
        let id = 100 + i as u16;
        if let Some(sz) = size.filter(|&sz| sz as usize > 16 + payload.len()) {
            // an oversized header: the server must consume exactly what the header announced
            let mut m = Vec::new();
            for v in [u32::from(id) | (u32::from(command) << 16), sz, 0, 0] {
                m.extend_from_slice(&v.to_le_bytes());
            }
            s.write_all(&m).unwrap();
            let body = vec![0xabu8; sz as usize - 16];
            s.write_all(&body).unwrap();
            let (fl, err, _) = read_reply(&mut s, id);
            assert!(
                fl & ERR != 0 && err == errno as u32,
                "{what}: flags {fl:#x} errno {err}"
            );
            continue;
        }
        let (fl, err, _) = raw(&mut s, id, command, &payload, size);
        assert!(
            fl & ERR != 0 && err == errno as u32,
            "{what}: flags {fl:#x} errno {err}"
        );
    }
    // Region accesses outside a region or of a nonexistent region.
    for (i, (region, off, count)) in [
        (0u32, 0x3ffe_u64, 4u32),
        (7, 0x1000, 4),
        (3, 0, 4),
        (0, u64::MAX - 1, 4),
        (0, 0x14, 3),
    ]
    .into_iter()
    .enumerate()
    {
        let (fl, err, _) = region_read(&mut s, 200 + i as u16, region, off, count);
        assert!(
            fl & ERR != 0 && err == libc::EINVAL as u32,
            "read region {region} {off:#x}+{count}"
        );
    }
    // A REGION_WRITE whose count does not match the data sent.
    let mut p = 0x14u64.to_le_bytes().to_vec();
    p.extend_from_slice(&0u32.to_le_bytes());
    p.extend_from_slice(&8u32.to_le_bytes());
    p.extend_from_slice(&[1, 0, 0, 0]);
    let (fl, err, _) = raw(&mut s, 300, 10, &p, None);
    assert!(
        fl & ERR != 0 && err == libc::EINVAL as u32,
        "write count mismatch"
    );
    // Still in step and serving: CAP reads correctly, config space says NVMe.
    let (fl, _, body) = region_read(&mut s, 301, 0, 0, 8);
    assert_eq!(fl & ERR, 0);
    let cap = u64::from_le_bytes(body[16..24].try_into().unwrap());
    assert_eq!(cap & 0xffff, 1023, "CAP.MQES");
    let (_, _, body) = region_read(&mut s, 302, 7, 8, 4);
    assert_eq!(
        u32::from_le_bytes(body[16..20].try_into().unwrap()) >> 8,
        0x010802,
        "class code"
    );
    drop(s);
    // The next client is served normally (full bring-up with the independent client).
    let mut n = NvmeClient::connect(&sock);
    assert!(n.submit(0, cmd(0x06, 0, 0x10000, &[1])).ok());
    drop(n);
    d.stop().unwrap();
    std::fs::remove_dir_all(dir).ok();
}
