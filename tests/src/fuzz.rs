//! Fuzz harnesses, shared by the `cargo fuzz` targets in `fuzz/` (libFuzzer, nightly) and by
//! `tests/tests/fuzz_smoke.rs` (stable, pseudo-random inputs, runs in CI). Each harness feeds
//! untrusted bytes to one parser and checks invariants; a panic is a finding.

use std::os::fd::AsFd;
use std::sync::{Arc, Mutex, OnceLock};

use device_model::backend::MallocBackend;
use device_model::memory::Protection;
use device_model::subsystem::MemoryPool;
use device_model::{Controller, ControllerConfig, Doorbells, GuestMemory, Subsystem};
use qemu_vfio_user::server::protocol::{self, Header, Request};
use zerocopy::FromBytes;

/// vfio-user message parser: header checks, then the command payload. The first byte after
/// the header says how many file descriptors "arrived" with the message.
pub fn vfio_user_message(data: &[u8]) {
    let Some((nfds, msg)) = data.split_first() else {
        return;
    };
    let Ok((header, rest)) = Header::read_from_prefix(msg) else {
        return;
    };
    let Ok(body_len) = protocol::check_header(&header) else {
        return;
    };
    assert!(body_len <= protocol::MAX_MSG_SIZE - protocol::HEADER_SIZE);
    let body = &rest[..body_len.min(rest.len())];
    let nfds = usize::from(*nfds) % (protocol::MAX_MSG_FDS + 2);
    let Ok(req) = protocol::parse_request(header.command.get(), body, nfds) else {
        return;
    };
    match req {
        Request::RegionWrite { data, .. } => {
            assert!(data.len() <= protocol::MAX_DATA_XFER);
            assert!(data.len() <= body.len());
        }
        Request::RegionRead { count, .. } => {
            assert!(count as usize <= protocol::MAX_DATA_XFER);
        }
        Request::Version { caps, .. } => assert!(caps.len() <= body.len()),
        _ => {}
    }
}

/// Guest memory the command harness maps at IOVA 0 (queues, PRP lists, SGLs, data).
const GUEST_MEM: u64 = 1 << 20;
const ASQ: u64 = 0x0;
const ACQ: u64 = 0x1000;
const IOSQ: u64 = 0x2000;
const IOCQ: u64 = 0x3000;
const QSIZE: u32 = 64;

struct World {
    mem: Arc<GuestMemory>,
    doorbells: Arc<Doorbells>,
    /// Our own view of the guest memory (same memfd).
    view: *mut u8,
}

// SAFETY: the raw view pointer is only used while holding the Mutex around World.
unsafe impl Send for World {}

fn world() -> &'static Mutex<World> {
    static W: OnceLock<Mutex<World>> = OnceLock::new();
    W.get_or_init(|| {
        let (fd, view) = crate::shared_memory::shared_memory(c"fuzz-guest", GUEST_MEM);
        let mem = Arc::new(GuestMemory::new());
        mem.map_fd(
            0,
            GUEST_MEM,
            fd.as_fd(),
            0,
            Protection {
                read: true,
                write: true,
            },
        )
        .expect("map guest memory");
        Mutex::new(World {
            mem,
            doorbells: Arc::new(Doorbells::new().expect("doorbells")),
            view,
        })
    })
}

impl World {
    fn write(&mut self, off: u64, data: &[u8]) {
        assert!(off + data.len() as u64 <= GUEST_MEM);
        // SAFETY: bounds checked against our GUEST_MEM-byte mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.view.add(off as usize), data.len());
        }
    }
}

fn sqe(opcode: u8, cid: u16, prp1: u64, cdw10: u32, cdw11: u32) -> [u8; 64] {
    let mut s = [0u8; 64];
    s[0] = opcode;
    s[2..4].copy_from_slice(&cid.to_le_bytes());
    s[24..32].copy_from_slice(&prp1.to_le_bytes());
    s[40..44].copy_from_slice(&cdw10.to_le_bytes());
    s[44..48].copy_from_slice(&cdw11.to_le_bytes());
    s
}

/// NVMe command handling: a fresh controller with one 1 MiB RAM namespace, an admin queue
/// pair and I/O queue pair 1 in guest memory whose remaining bytes are the input repeated
/// (so PRP lists and SGL segments point at fuzzer-chosen data). Input: byte 0 = admin
/// commands (0..=7), byte 1..3 = an extra SQ 1 doorbell value, then 64-byte commands, the
/// first ones to the admin queue, the rest to SQ 1.
pub fn nvme_commands(data: &[u8]) {
    if data.len() < 3 {
        return;
    }
    let n_admin = usize::from(data[0] % 8);
    let extra_doorbell = u32::from(u16::from_le_bytes([data[1], data[2]]));
    let cmds: Vec<[u8; 64]> = data[3..]
        .chunks(64)
        .take((QSIZE as usize - 4) * 2)
        .map(|c| {
            let mut s = [0u8; 64];
            s[..c.len()].copy_from_slice(c);
            s
        })
        .collect();
    let mut w = world()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // queues zeroed, the rest of memory filled with the input
    w.write(0, &vec![0u8; 0x4000]);
    let mut fill = Vec::with_capacity((GUEST_MEM - 0x4000) as usize);
    while fill.len() < (GUEST_MEM - 0x4000) as usize {
        fill.extend_from_slice(&data[..data.len().min((GUEST_MEM - 0x4000) as usize - fill.len())]);
    }
    w.write(0x4000, &fill);
    w.doorbells.clear();
    // a subsystem of two controllers with a 4 MiB namespace pool: Namespace Management and
    // Attachment (0Dh/15h), Identify 10h-13h and log page 04h are reachable
    let backend = MallocBackend::new(1 << 20).expect("malloc backend");
    let sub = Subsystem::new("nqn.fuzz", Some(Box::new(MemoryPool { capacity: 4 << 20 })));
    sub.add_controller(1);
    sub.add_controller(2);
    sub.add_namespace(1, Box::new(backend), 9, "FUZZ", &[1, 2]);
    let cfg = ControllerConfig {
        serial: "FUZZ".into(),
        max_io_queues: 4,
        subsystem: Some(Arc::clone(&sub)),
        namespace_management: true,
        shared_namespaces: true,
        ..ControllerConfig::default()
    };
    let namespaces = sub.namespaces_for(1);
    let mut ctrl = Controller::new(
        cfg,
        Arc::clone(&w.mem),
        Arc::clone(&w.doorbells),
        namespaces,
    );
    ctrl.write_register(0x24, u64::from(((QSIZE - 1) << 16) | (QSIZE - 1)), 4);
    ctrl.write_register(0x28, ASQ, 8);
    ctrl.write_register(0x30, ACQ, 8);
    ctrl.write_register(0x14, (6 << 16) | (4 << 20) | 1, 4);
    assert!(ctrl.is_ready(), "valid enable");

    // set up I/O queue pair 1, then the fuzzed admin commands
    let mut admin = vec![
        sqe(0x09, 0xf000, 0, 0x07, 0x0003_0003),
        sqe(0x05, 0xf001, IOCQ, ((QSIZE - 1) << 16) | 1, 1),
        sqe(0x01, 0xf002, IOSQ, ((QSIZE - 1) << 16) | 1, (1 << 16) | 1),
    ];
    admin.extend(cmds.iter().take(n_admin).copied());
    let io: Vec<[u8; 64]> = cmds
        .iter()
        .skip(n_admin)
        .take(QSIZE as usize - 1)
        .copied()
        .collect();
    for (i, s) in admin.iter().enumerate() {
        w.write(ASQ + i as u64 * 64, s);
    }
    w.doorbells.store(0, admin.len() as u32);
    for _ in 0..4 {
        ctrl.poll();
    }
    for (i, s) in io.iter().enumerate() {
        w.write(IOSQ + i as u64 * 64, s);
    }
    w.doorbells.store(2, io.len() as u32);
    for _ in 0..8 {
        ctrl.poll();
    }
    // a doorbell value from the input (often past the queue size), then a host that consumed
    // every completion
    w.doorbells.store(2, extra_doorbell);
    w.doorbells.store(3, extra_doorbell);
    for _ in 0..4 {
        ctrl.poll();
    }
    // controller reset must drain and tear down whatever state the commands left
    ctrl.write_register(0x14, 0, 4);
    assert!(!ctrl.is_ready(), "reset clears CSTS.RDY");
}

/// The daemon the RPC harness talks to: a PF with two VFs and a namespace pool.
fn rpc_daemon() -> &'static Mutex<vnvme::daemon::Daemon> {
    static D: OnceLock<Mutex<vnvme::daemon::Daemon>> = OnceLock::new();
    D.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("vnvme-fuzz-rpc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("fuzz dir");
        let cfg = vnvme::config::Config::parse(
            &format!(
                "[[controller]]\nsocket = \"{}\"\nnqn = \"nqn.fuzz\"\nvfs = 2\n\
                 namespace_pool = \"malloc:16M\"\n\
                 [[controller.namespace]]\nbackend = \"malloc:4M\"\n",
                dir.join("pf.sock").display()
            ),
            std::path::Path::new("fuzz.toml"),
        )
        .expect("fuzz config");
        Mutex::new(vnvme::daemon::Daemon::start(&cfg).expect("fuzz daemon"))
    })
}

/// The management socket's request handling: one request line against a running daemon
/// (`subsystem_create`/`subsystem_delete` are left out: they make and remove sockets).
/// Invariant: every line gets one JSON-RPC response with a result or an error.
pub fn rpc_request(data: &[u8]) {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data)
        && v.get("method")
            .and_then(serde_json::Value::as_str)
            .is_some_and(|m| m.starts_with("subsystem_c") || m.starts_with("subsystem_d"))
    {
        return;
    }
    let mut d = rpc_daemon()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let answer = vnvme::rpc::answer(data, &mut d);
    let v: serde_json::Value = serde_json::from_str(&answer).expect("the answer is JSON");
    assert!(
        v.get("result").is_some() != v.get("error").is_some(),
        "one of result and error: {answer}"
    );
}

/// Request lines worth starting from (each method, good and bad parameters).
pub fn rpc_request_seeds() -> Vec<Vec<u8>> {
    [
        r#"{"jsonrpc":"2.0","id":1,"method":"controller_list"}"#,
        r#"{"id":2,"method":"subsystem_list","params":{}}"#,
        r#"{"method":"ns_create","params":{"nqn":"nqn.fuzz","size":"1M","block_size":4096}}"#,
        r#"{"method":"ns_attach","params":{"nqn":"nqn.fuzz","nsid":2,"controllers":[1,4097]}}"#,
        r#"{"method":"ns_detach","params":{"nqn":"nqn.fuzz","nsid":2,"controllers":[4097]}}"#,
        r#"{"method":"ns_delete","params":{"nqn":"nqn.fuzz","nsid":4294967295}}"#,
        r#"{"method":"qos_set","params":{"cntlid":4097,"iops":1000,"bandwidth":"1M"}}"#,
        r#"{"method":"qos_set","params":{"cntlid":4097}}"#,
        r#"{"method":"vf_enable","params":{"nqn":"nqn.fuzz","count":2}}"#,
        r#"{"method":"vf_enable","params":{"nqn":"nqn.fuzz","count":0}}"#,
        r#"{"method":"ns_create","params":{"nqn":"nqn.fuzz","size":-1}}"#,
        r#"{"method":7}"#,
        "[1,2,3]",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

/// NVMe/TCP PDU decoder. The first byte picks the direction and the negotiated digests;
/// the rest is one received PDU. Invariants: the common header check and the full decode
/// agree on refusals; a PDU that decodes re-encodes to bytes that decode to the same PDU.
pub fn nvme_tcp_pdu(data: &[u8]) {
    use nvmeof::pdu::{Direction, Negotiated, check_common, decode, encode};
    let Some((&mode, pdu)) = data.split_first() else {
        return;
    };
    let dir = if mode & 1 == 0 {
        Direction::ToController
    } else {
        Direction::ToHost
    };
    let neg = Negotiated {
        header_digest: mode & 2 != 0,
        data_digest: mode & 4 != 0,
        max_data: if mode & 8 != 0 { 4096 } else { 131_072 },
    };
    let decoded = decode(pdu, dir, &neg);
    if let Some(first) = pdu.first_chunk::<8>()
        && check_common(first, dir, &neg).is_err()
    {
        assert!(decoded.is_err(), "header refused but PDU accepted");
    }
    if let Ok(p) = decoded {
        let mut again = Vec::new();
        encode(&p, &neg, &mut again);
        // a term request is re-encoded as C2H; compare it decoded as the host would
        let dir2 = match p {
            nvmeof::Pdu::TermReq { .. } => Direction::ToHost,
            _ => dir,
        };
        let q = decode(&again, dir2, &neg).expect("our own encoding decodes");
        assert_eq!(p, q, "re-encoded PDU differs");
    }
}

/// Inputs for [`nvme_tcp_pdu`]: every PDU type, well formed, in each direction it travels
/// and with each digest setting (the first byte is the mode, as the harness reads it).
pub fn nvme_tcp_pdu_seeds() -> Vec<Vec<u8>> {
    use nvmeof::pdu::{Negotiated, Pdu, encode};
    let data: Vec<u8> = (0..600u32).map(|i| i as u8).collect();
    let mut sqe = nvme_spec::Submission::default();
    sqe.opcode = 0x01;
    sqe.flags = 0x40;
    sqe.prp2 = (0x258_u64 | (0x01 << 56)).into();
    let pdus: [(u8, Pdu<'_>); 9] = [
        (
            0,
            Pdu::IcReq {
                pfv: 0,
                hpda: 0,
                dgst: 3,
                maxr2t: 0,
            },
        ),
        (
            1,
            Pdu::IcResp {
                pfv: 0,
                cpda: 0,
                dgst: 3,
                maxh2cdata: 131_072,
            },
        ),
        (0, Pdu::CapsuleCmd { sqe, data: &data }),
        (0, Pdu::CapsuleCmd { sqe, data: &[] }),
        (
            1,
            Pdu::CapsuleResp {
                cqe: nvme_spec::Completion::default(),
            },
        ),
        (
            0,
            Pdu::H2CData {
                cccid: 1,
                ttag: 2,
                offset: 512,
                data: &data,
                last: true,
            },
        ),
        (
            1,
            Pdu::C2HData {
                cccid: 1,
                offset: 0,
                data: &data,
                last: true,
                success: true,
            },
        ),
        (
            1,
            Pdu::R2T {
                cccid: 1,
                ttag: 2,
                offset: 0,
                length: 4096,
            },
        ),
        (
            1,
            Pdu::TermReq {
                fes: 2,
                fei: 0,
                header: &data[..24],
            },
        ),
    ];
    let mut out = Vec::new();
    for (dir, p) in &pdus {
        for digests in 0..4u8 {
            let neg = Negotiated {
                header_digest: digests & 1 != 0,
                data_digest: digests & 2 != 0,
                max_data: 131_072,
            };
            let mut buf = vec![dir | (digests << 1)];
            let mut pdu = Vec::new();
            encode(p, &neg, &mut pdu);
            buf.extend_from_slice(&pdu);
            out.push(buf);
        }
    }
    out
}

/// A backend that answers late: each request is held for `delay` polls and only then
/// performed on the RAM backend behind it (so a read writes guest memory at completion
/// time, as a remote or device backend does). A request whose memory was freed under it
/// (a reset, a DMA unmap) is a use-after-unmap the sanitizer reports.
struct LateBackend {
    inner: MallocBackend,
    held: Vec<Held>,
    delay: u32,
}

struct Held {
    tag: u64,
    op: device_model::backend::IoOp,
    offset: u64,
    iov: Vec<libc::iovec>,
    polls_left: u32,
}

// SAFETY: the held iovecs point into guest memory the controller keeps mapped (its command
// slot's memory snapshot) until this backend completes the request; one thread uses them.
unsafe impl Send for LateBackend {}

impl device_model::backend::Backend for LateBackend {
    fn describe(&self) -> String {
        "late".into()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn submit(
        &mut self,
        req: &device_model::backend::IoRequest<'_>,
    ) -> Result<(), nvme_spec::Status> {
        self.held.push(Held {
            tag: req.tag,
            op: req.op,
            offset: req.offset,
            iov: req.iov.to_vec(),
            polls_left: self.delay,
        });
        Ok(())
    }
    fn poll(&mut self, done: &mut dyn FnMut(u64, nvme_spec::Status)) -> usize {
        let mut n = 0;
        let mut i = 0;
        while i < self.held.len() {
            if self.held[i].polls_left > 0 {
                self.held[i].polls_left -= 1;
                i += 1;
                continue;
            }
            let h = self.held.swap_remove(i);
            let r = self.inner.submit(&device_model::backend::IoRequest {
                tag: h.tag,
                op: h.op,
                offset: h.offset,
                iov: &h.iov,
            });
            match r {
                Ok(()) => n += self.inner.poll(done),
                Err(s) => {
                    done(h.tag, s);
                    n += 1;
                }
            }
        }
        n
    }
    fn in_flight(&self) -> usize {
        self.held.len() + self.inner.in_flight()
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), nvme_spec::Status> {
        self.inner.write_zeroes(offset, len)
    }
    fn read_sync(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), nvme_spec::Status> {
        self.inner.read_sync(offset, buf)
    }
    fn flush_sync(&mut self) -> Result<(), nvme_spec::Status> {
        Ok(())
    }
}

/// Guest memory of the controller harness: two regions the input maps and unmaps.
const REGION: u64 = 256 << 10;

/// The whole controller as a guest and its vfio-user client drive it: BAR0 register writes,
/// doorbells, SQEs and shadow doorbell values written into guest memory, DMA map and unmap
/// of the memory the queues live in, device resets, Keep Alive checks at fuzzer-chosen
/// times, all while a late-answering backend holds I/O in flight. Input: a stream of ops
/// (one byte each plus arguments, see the match). Invariants: nothing panics; a final
/// device reset finishes and every retired request drains within a bounded number of polls.
/// Returns how many resets found requests in flight (so seeds can show they reach them).
pub fn controller_ops(data: &[u8]) -> u32 {
    let mut resets_under_io = 0;
    use std::time::{Duration, Instant};
    let (fd_a, view_a) = controller_memory();
    let mem = Arc::new(GuestMemory::new());
    let rw = Protection {
        read: true,
        write: true,
    };
    let doorbells = Arc::new(Doorbells::new().expect("doorbells"));
    let backend = LateBackend {
        inner: MallocBackend::new(1 << 20).expect("malloc backend"),
        held: Vec::new(),
        delay: 3,
    };
    let ns = device_model::Namespace::new(1, Box::new(backend), 9, "FUZZ");
    let cfg = ControllerConfig {
        serial: "FUZZOPS".into(),
        max_io_queues: 4,
        ..ControllerConfig::default()
    };
    let mut ctrl = Controller::new(cfg, Arc::clone(&mem), Arc::clone(&doorbells), vec![ns]);
    let _ = mem.map_fd(0, REGION, fd_a.as_fd(), 0, rw);
    // SAFETY: view_a is our REGION-byte mapping of the same memfd; cleared for this input.
    unsafe { std::ptr::write_bytes(view_a, 0, REGION as usize) };
    let write_mem = |off: u64, bytes: &[u8]| {
        let off = off % REGION;
        let n = bytes.len().min((REGION - off) as usize);
        // SAFETY: off + n <= REGION, inside our mapping.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), view_a.add(off as usize), n) };
    };
    let mut rd = Reader(data);
    let regs = [
        0x0c, 0x10, 0x14, 0x1c, 0x20, 0x24, 0x28, 0x2c, 0x30, 0x34, 0x38,
    ];
    while let Some(op) = rd.u8() {
        match op % 12 {
            0 => {
                let off = regs[usize::from(rd.u8().unwrap_or(0)) % regs.len()];
                let v = rd.u64().unwrap_or(0);
                let len = if rd.u8().unwrap_or(0) & 1 == 0 { 4 } else { 8 };
                ctrl.write_register(off, v, len);
            }
            1 => {
                let i = usize::from(rd.u8().unwrap_or(0) % 10);
                doorbells.store(i, u32::from(rd.u16().unwrap_or(0)));
            }
            2 => {
                // an SQE into one of the queue pages (admin SQ at 0, I/O SQ 1 at 0x2000)
                let slot = u64::from(rd.u8().unwrap_or(0) % 64);
                let page = if rd.u8().unwrap_or(0) & 1 == 0 {
                    0
                } else {
                    0x2000
                };
                write_mem(page + slot * 64, rd.take(64));
            }
            3 => {
                for _ in 0..=rd.u8().unwrap_or(0) % 8 {
                    ctrl.poll();
                }
            }
            4 => {
                // the client takes its memory away, or gives it back, or maps garbage
                match rd.u8().unwrap_or(0) % 4 {
                    0 => {
                        let _ = mem.unmap(0, REGION);
                    }
                    1 => {
                        let _ = mem.map_fd(0, REGION, fd_a.as_fd(), 0, rw);
                    }
                    2 => {
                        let _ = mem.map_fd(rd.u64().unwrap_or(0), REGION * 4, fd_a.as_fd(), 0, rw);
                    }
                    _ => mem.clear(),
                }
            }
            5 => {
                if rd.u8().unwrap_or(0) & 1 == 0 {
                    ctrl.device_reset();
                } else {
                    ctrl.reset();
                }
                resets_under_io += u32::from(ctrl.is_resetting());
            }
            6 => {
                let ms = u64::from(rd.u16().unwrap_or(0)) * 100;
                ctrl.check_keep_alive(Instant::now() + Duration::from_millis(ms));
            }
            7 => {
                // a well-formed enable and I/O queue pair 1, to reach deep states quickly
                ctrl.write_register(0x14, 0, 4);
                for _ in 0..64 {
                    if !ctrl.is_resetting() {
                        break;
                    }
                    ctrl.poll();
                }
                ctrl.write_register(0x24, u64::from(((QSIZE - 1) << 16) | (QSIZE - 1)), 4);
                ctrl.write_register(0x28, ASQ, 8);
                ctrl.write_register(0x30, ACQ, 8);
                ctrl.write_register(0x14, (6 << 16) | (4 << 20) | 1, 4);
                write_mem(ASQ, &sqe(0x05, 0xf001, IOCQ, ((QSIZE - 1) << 16) | 1, 1));
                write_mem(
                    ASQ + 64,
                    &sqe(0x01, 0xf002, IOSQ, ((QSIZE - 1) << 16) | 1, (1 << 16) | 1),
                );
                doorbells.store(0, 2);
                ctrl.poll();
            }
            8 => {
                // shadow doorbell / EventIdx pages live at 0x8000 / 0x9000 if configured
                let off = 0x8000 + u64::from(rd.u8().unwrap_or(0) % 32) * 4;
                write_mem(off, &rd.u16().unwrap_or(0).to_le_bytes());
            }
            9 => {
                // a read or write of fuzzer-chosen LBAs through a PRP into region A
                let slot = u64::from(rd.u8().unwrap_or(0) % 63);
                let opcode = if rd.u8().unwrap_or(0) & 1 == 0 {
                    0x01
                } else {
                    0x02
                };
                let mut s = sqe(opcode, 0x100 + slot as u16, 0x10000 + slot * 0x1000, 0, 0);
                s[4..8].copy_from_slice(&1u32.to_le_bytes());
                s[48..52].copy_from_slice(&u32::from(rd.u8().unwrap_or(0) % 8).to_le_bytes());
                write_mem(IOSQ + slot * 64, &s);
                doorbells.store(2, (slot as u32 + 1) % QSIZE);
            }
            10 => {
                // Doorbell Buffer Config pointing at the shadow pages
                write_mem(
                    ASQ + 2 * 64,
                    &with_prp2(sqe(0x7c, 0xf003, 0x8000, 0, 0), 0x9000),
                );
                doorbells.store(0, 3);
            }
            _ => {
                let _ = ctrl.read_register(u64::from(rd.u8().unwrap_or(0)) * 4, 4);
            }
        }
    }
    // a final device reset always finishes, and retired requests drain
    ctrl.device_reset();
    for _ in 0..1000 {
        if !ctrl.is_quiescing() {
            break;
        }
        ctrl.poll();
    }
    assert!(!ctrl.is_resetting(), "device reset never finished");
    assert!(!ctrl.is_quiescing(), "retired requests never drained");
    resets_under_io
}

fn with_prp2(mut s: [u8; 64], prp2: u64) -> [u8; 64] {
    s[32..40].copy_from_slice(&prp2.to_le_bytes());
    s
}

/// The memfd behind [`controller_ops`]' region (one per process, cleared per input).
fn controller_memory() -> (std::os::fd::BorrowedFd<'static>, *mut u8) {
    struct Mem(std::os::fd::OwnedFd, usize);
    static M: OnceLock<Mem> = OnceLock::new();
    let m = M.get_or_init(|| {
        let (fd, view) = crate::shared_memory::shared_memory(c"fuzz-ops", REGION);
        Mem(fd, view as usize)
    });
    (m.0.as_fd(), m.1 as *mut u8)
}

/// Reads the fuzz input as little-endian fields; past the end everything is absent.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.0.split_at(n.min(self.0.len()));
        self.0 = b;
        a
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).first().copied()
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).try_into().ok().map(u16::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8).try_into().ok().map(u64::from_le_bytes)
    }
}
