//! Fuzz harnesses, shared by the `cargo fuzz` targets in `fuzz/` (libFuzzer, nightly) and by
//! `tests/tests/fuzz_smoke.rs` (stable, pseudo-random inputs, runs in CI). Each harness feeds
//! untrusted bytes to one parser and checks invariants; a panic is a finding.

use std::os::fd::AsFd;
use std::sync::{Arc, Mutex, OnceLock};

use device_model::backend::MallocBackend;
use device_model::memory::Protection;
use device_model::{Controller, ControllerConfig, Doorbells, GuestMemory};
use qemu_vfio_user::server::protocol::{self, Header, Request};
use sriov::{MemoryPool, Subsystem};
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
        subsystem: Some(Arc::clone(&sub) as Arc<dyn device_model::NvmSubsystem>),
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
        let d = vnvme::daemon::Daemon::start(&cfg).expect("fuzz daemon");
        // requests reach the daemon in-process, never through its sockets, and a static is
        // never dropped: unlink them now (they keep listening) so no run leaves them behind
        let _ = std::fs::remove_dir_all(&dir);
        Mutex::new(d)
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
    iov: device_model::backend::GuestBufferList,
    polls_left: u32,
}

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
            iov: device_model::backend::GuestBufferList::of(req.iov),
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
            let held = self.held.swap_remove(i);
            let started = self.inner.submit(&device_model::backend::IoRequest {
                tag: held.tag,
                op: held.op,
                offset: held.offset,
                iov: held.iov.as_buffers(),
            });
            match started {
                Ok(()) => n += self.inner.poll(done),
                Err(status) => {
                    done(held.tag, status);
                    n += 1;
                }
            }
        }
        n
    }
    fn in_flight(&self) -> usize {
        self.held.len() + self.inner.in_flight()
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
    fn u32(&mut self) -> Option<u32> {
        self.take(4).try_into().ok().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8).try_into().ok().map(u64::from_le_bytes)
    }
}

/// The NVMe/TCP target the [`nvme_tcp_target`] harness talks to (one per process). Any
/// panic in the process aborts it: the target contains a panic to one connection in
/// production, which would hide findings here.
fn tcp_target() -> std::net::SocketAddr {
    static T: OnceLock<(Mutex<vnvme::daemon::Daemon>, std::net::SocketAddr)> = OnceLock::new();
    T.get_or_init(|| {
        std::panic::set_hook(Box::new(|info| {
            eprintln!("panic: {info}");
            std::process::abort();
        }));
        let cfg = vnvme::config::Config::parse(
            "[[controller]]\ntcp_listen = \"127.0.0.1:0\"\nnqn = \"nqn.fuzz.tcp\"\n\
             [[controller.namespace]]\nbackend = \"malloc:4M\"\n",
            std::path::Path::new("fuzz-tcp.toml"),
        )
        .expect("fuzz target config");
        let d = vnvme::daemon::Daemon::start(&cfg).expect("fuzz target");
        let a = d.tcp_addrs()[0];
        (Mutex::new(d), a)
    })
    .1
}

/// The NVMe/TCP target's state machine from the network: ICReq, then a stream of PDUs
/// built from the input (structure-aware, so Connect, R2T/H2CData, CIDs, Keep Alive and
/// property access are reached; op bytes below), then the connection closes. Invariants:
/// nothing panics (the process aborts), and the target accepts and answers the next
/// connection (every input starts with one). Returns the bytes the target sent back.
pub fn nvme_tcp_target(data: &[u8]) -> usize {
    use nvme_spec::fabrics::{ConnectData, fctype, put_str};
    use nvmeof::pdu::{Negotiated, Pdu, encode_append};
    use std::io::Write;
    use zerocopy::IntoBytes;
    let addr = tcp_target();
    let mut s = std::net::TcpStream::connect(addr).expect("the target still accepts");
    s.set_read_timeout(Some(std::time::Duration::from_millis(5)))
        .ok();
    let neg = Negotiated {
        header_digest: false,
        data_digest: false,
        max_data: 131_072,
    };
    let mut out = Vec::new();
    let mut rd = Reader(data);
    encode_append(
        &Pdu::IcReq {
            pfv: 0,
            hpda: 0,
            dgst: 0,
            maxr2t: 0,
        },
        &neg,
        &mut out,
    );
    // a host waits for ICResp before its next PDU (NVMe/TCP 1.0 §3.6.2.2)
    if s.write_all(&out).is_err() {
        return 0;
    }
    out.clear();
    let mut got = read_for(&mut s, std::time::Duration::from_millis(100));
    let payload: Vec<u8> = (0..8192u32).map(|i| i as u8).collect();
    let mut cid = 0u16;
    while let Some(op) = rd.u8() {
        let mut sqe = nvme_spec::Submission::default();
        cid = cid.wrapping_add(1);
        sqe.cid = rd
            .u16()
            .map_or(cid, |c| if op & 0x80 != 0 { c } else { cid })
            .into();
        match op % 8 {
            0 | 1 => {
                // Connect: admin (0) or an I/O queue, with fuzzed queue size / KATO / cntlid
                let mut d = ConnectData::default();
                d.cntlid = rd.u16().unwrap_or(0xffff).into();
                put_str(&mut d.subnqn, "nqn.fuzz.tcp");
                put_str(&mut d.hostnqn, "nqn.2014-08.org.nvmexpress:uuid:fuzz");
                sqe.opcode = 0x7f;
                sqe.nsid = u32::from(fctype::CONNECT).into();
                sqe.flags = 0x40;
                sqe.prp2 = (1024u64 | (0x01 << 56)).into();
                sqe.cdw10 =
                    (u32::from(op % 2) << 16 | u32::from(rd.u8().unwrap_or(0) % 4) << 16).into();
                sqe.cdw11 = u32::from(rd.u16().unwrap_or(31)).into();
                sqe.cdw12 = rd.u32().unwrap_or(0).into();
                encode_append(
                    &Pdu::CapsuleCmd {
                        sqe,
                        data: d.as_bytes(),
                    },
                    &neg,
                    &mut out,
                );
            }
            2 => {
                // property get/set (fabrics) with fuzzed offset and value
                sqe.opcode = 0x7f;
                sqe.nsid = u32::from(if rd.u8().unwrap_or(0) & 1 == 0 {
                    fctype::PROPERTY_GET
                } else {
                    fctype::PROPERTY_SET
                })
                .into();
                sqe.cdw10 = u32::from(rd.u8().unwrap_or(0) & 1).into();
                sqe.cdw11 = u32::from(rd.u8().unwrap_or(0x14)).into();
                sqe.cdw12 = rd.u32().unwrap_or(1).into();
                encode_append(&Pdu::CapsuleCmd { sqe, data: &[] }, &neg, &mut out);
            }
            3 => {
                // a write: in-capsule data of fuzzed length, or none (the target sends R2T)
                sqe.opcode = 0x01;
                sqe.nsid = 1.into();
                sqe.flags = 0x40;
                let blocks = u32::from(rd.u8().unwrap_or(0) % 16);
                sqe.cdw12 = blocks.into();
                let len = u64::from(rd.u16().unwrap_or(512)) % 8192;
                let incapsule = rd.u8().unwrap_or(0) & 1 == 0;
                // SGL Data Block, offset in the capsule (01h), or Transport Data Block (5Ah)
                let sgl_id: u64 = if incapsule { 0x01 } else { 0x5a };
                sqe.prp2 = (len | (sgl_id << 56)).into();
                let data = if incapsule {
                    &payload[..len as usize]
                } else {
                    &[][..]
                };
                encode_append(&Pdu::CapsuleCmd { sqe, data }, &neg, &mut out);
            }
            4 => {
                // H2CData for a fuzzed command / transfer tag / offset / length
                let cccid = rd.u16().unwrap_or(cid);
                let ttag = rd.u16().unwrap_or(0);
                let offset = u32::from(rd.u16().unwrap_or(0));
                let len = usize::from(rd.u16().unwrap_or(512)) % 8192;
                let last = rd.u8().unwrap_or(1) & 1 == 1;
                encode_append(
                    &Pdu::H2CData {
                        cccid,
                        ttag,
                        offset,
                        data: &payload[..len],
                        last,
                    },
                    &neg,
                    &mut out,
                );
            }
            5 => {
                // an admin or I/O command of any opcode (Keep Alive = 18h, Read, Identify...)
                sqe.opcode = rd.u8().unwrap_or(0x18);
                sqe.nsid = rd.u32().unwrap_or(1).into();
                sqe.cdw10 = rd.u32().unwrap_or(0).into();
                sqe.flags = 0x40;
                sqe.prp2 = (u64::from(rd.u16().unwrap_or(4096)) | (0x5a << 56)).into();
                encode_append(&Pdu::CapsuleCmd { sqe, data: &[] }, &neg, &mut out);
            }
            6 => {
                // raw bytes: a PDU the encoder would never make
                let n = usize::from(rd.u8().unwrap_or(0));
                out.extend_from_slice(rd.take(n));
            }
            _ => {
                // send what is built so far and read what comes back (keeps state moving)
                if s.write_all(&out).is_err() {
                    return got;
                }
                out.clear();
                got += read_for(&mut s, std::time::Duration::from_millis(100));
            }
        }
    }
    if s.write_all(&out).is_ok() {
        got += read_for(&mut s, std::time::Duration::from_millis(100));
    }
    got
}

/// Read what the target answers: until it has been quiet for 5 ms after answering, or `t`
/// passed; returns the byte count.
fn read_for(s: &mut std::net::TcpStream, t: std::time::Duration) -> usize {
    use std::io::Read;
    let start = std::time::Instant::now();
    let mut last = None;
    let mut buf = vec![0u8; 65536];
    let mut n = 0;
    while start.elapsed() < t
        && last
            .is_none_or(|l: std::time::Instant| l.elapsed() < std::time::Duration::from_millis(5))
    {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => {
                n += k;
                last = Some(std::time::Instant::now());
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
                ) => {}
            Err(_) => break,
        }
    }
    n
}

/// Inputs for [`nvme_tcp_target`] that reach its states: an admin Connect, then property
/// access and Keep Alive; an I/O queue Connect and writes through R2T/H2CData (right, wrong
/// tag, wrong offset, past the end), in-capsule writes, reads; a second admin Connect.
pub fn nvme_tcp_target_seeds() -> Vec<Vec<u8>> {
    // op bytes as nvme_tcp_target reads them: op, cid (u16), then the op's fields
    let connect_admin = [0u8, 1, 0, 0xff, 0xff, 0, 31, 0, 0x30, 0x75, 0, 0];
    let connect_io = [1u8, 2, 0, 1, 0, 1, 31, 0, 0, 0, 0, 0];
    let flush = [7u8, 0, 0];
    let mut seeds = Vec::new();
    let mut admin = connect_admin.to_vec();
    admin.extend_from_slice(&flush);
    admin.extend_from_slice(&[2, 3, 0, 0, 0, 0x14, 1, 0, 0, 0]); // property get CC
    admin.extend_from_slice(&[2, 4, 0, 1, 0, 0x14, 1, 0, 0x46, 0]); // property set CC.EN
    admin.extend_from_slice(&[5, 5, 0, 0x18, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]); // Keep Alive
    admin.extend_from_slice(&[5, 6, 0, 0x06, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0x10]); // Identify
    admin.extend_from_slice(&flush);
    seeds.push(admin.clone());
    let mut io = admin;
    io.extend_from_slice(&connect_io);
    io.extend_from_slice(&flush);
    for (i, (ttag, off, len, last)) in [
        (0u16, 0u16, 512u16, 1u8),
        (0, 512, 512, 1),
        (9, 0, 512, 1),
        (0, 0, 8000, 0),
    ]
    .iter()
    .enumerate()
    {
        let cid = 0x20 + i as u16;
        io.extend_from_slice(&[3 | 0x80]);
        io.extend_from_slice(&cid.to_le_bytes());
        io.extend_from_slice(&[0, 0, 2, 1]); // 1 block, 512 bytes, via R2T
        io.extend_from_slice(&flush);
        io.push(4);
        io.extend_from_slice(&cid.to_le_bytes());
        io.extend_from_slice(&cid.to_le_bytes());
        io.extend_from_slice(&ttag.to_le_bytes());
        io.extend_from_slice(&off.to_le_bytes());
        io.extend_from_slice(&len.to_le_bytes());
        io.push(*last);
        io.extend_from_slice(&flush);
    }
    io.extend_from_slice(&[3, 0x30, 0, 1, 0, 2, 0]); // in-capsule write, 512 bytes
    io.extend_from_slice(&[5, 0x31, 0, 0x02, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0x02]); // read
    io.extend_from_slice(&flush);
    seeds.push(io);
    let mut twice = connect_admin.to_vec();
    twice.extend_from_slice(&connect_admin);
    twice.extend_from_slice(&[6, 8, 0, 1, 2, 3, 4, 5, 6, 7, 8]);
    twice.extend_from_slice(&flush);
    seeds.push(twice);
    seeds
}

/// Hand-made op streams for [`controller_ops`]: enable, I/O held in flight, then each kind
/// of teardown under it; Keep Alive FFFFFFFFh; shadow doorbells with garbage values.
pub fn controller_ops_seeds() -> Vec<Vec<u8>> {
    let enable = vec![7, 3, 7];
    // reads and writes in flight (late backend), then each kind of teardown under them
    let io: Vec<u8> = (0..8u8).flat_map(|i| [9, i, i & 1, i]).collect();
    let mut out = Vec::new();
    for teardown in [
        vec![5, 0],                            // device reset
        vec![5, 1],                            // controller reset
        vec![4, 0, 3, 7],                      // DMA unmap of the queue memory, polls
        vec![4, 3, 5, 1, 3, 7],                // client forgets all memory, reset
        vec![0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0], // CC = 0 through the register
        vec![6, 0xff, 0xff],                   // Keep Alive check far in the future
    ] {
        let mut s = enable.clone();
        s.extend_from_slice(&io);
        s.push(3);
        s.push(1);
        s.extend_from_slice(&teardown);
        s.extend_from_slice(&[3, 7, 7, 3, 7]);
        out.push(s);
    }
    // Keep Alive Timeout FFFFFFFFh through Set Features, then a check
    let mut ka = enable.clone();
    let mut set_features = vec![2, 2, 0, 0x09];
    set_features.extend_from_slice(&[0; 39]);
    set_features.extend_from_slice(&[0x0f, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
    set_features.extend_from_slice(&[0; 16]);
    ka.extend_from_slice(&set_features);
    ka.extend_from_slice(&[1, 0, 3, 0, 3, 7, 6, 0x10, 0x00]);
    out.push(ka);
    // shadow doorbells configured, then garbage shadow values
    let mut sh = enable;
    sh.extend_from_slice(&[10, 3, 7, 8, 0, 0xff, 0xff, 8, 1, 0x40, 0, 9, 1, 0, 1, 3, 7]);
    out.push(sh);
    out
}

/// A mutation of `seed` for the CI smoke runs: 1 to `max_edits` random byte replacements,
/// insertions or removals; an input emptied by removals becomes `[fill]`.
pub fn mutate(rng: &mut vnvme::perf::Rng, seed: &[u8], max_edits: u64, fill: u8) -> Vec<u8> {
    let mut input = seed.to_vec();
    for _ in 0..=(rng.next() % max_edits) {
        if input.is_empty() {
            input.push(fill);
        }
        let at = (rng.next() as usize) % input.len();
        match rng.next() % 3 {
            0 => input[at] = rng.next() as u8,
            1 => input.insert(at, rng.next() as u8),
            _ => {
                input.remove(at);
            }
        }
    }
    if input.is_empty() {
        input.push(fill);
    }
    input
}

/// NVMe/RDMA capsule parsing (what a target does with a receive buffer and a connect
/// request's private data). Byte 0 picks the receive buffer size (bit 0: an admin queue's
/// 64 bytes, else 64 + 8 KiB); the rest is one received message, also read as RDMA CM
/// private data. Invariants: a capsule is a command and exactly its in-capsule bytes; a
/// data pointer agrees with them (in-capsule length = bytes present, keyed only without
/// in-capsule bytes, 24-bit length); a keyed command rewritten to in-capsule data decodes as
/// such; an accepted connect request is within the limits and round-trips.
pub fn rdma_capsule(data: &[u8]) {
    use nvmeof::rdma::cm_records::ConnectRequest;
    use nvmeof::rdma::sgl::{DataPointer, data_pointer, set_in_capsule, split_capsule};
    let Some((&mode, msg)) = data.split_first() else {
        return;
    };
    let max = if mode & 1 == 0 { 64 + 8192 } else { 64 };
    if let Some((sqe, inline)) = split_capsule(msg, max) {
        assert_eq!(inline.len() + 64, msg.len());
        match data_pointer(&sqe, inline.len()) {
            Ok(DataPointer::None) => assert!(inline.is_empty()),
            Ok(DataPointer::InCapsule { len }) => assert_eq!(len, inline.len()),
            Ok(DataPointer::Keyed { len, .. }) => {
                assert!(inline.is_empty() && len > 0 && len <= 0xff_ffff);
                let mut again = sqe;
                set_in_capsule(&mut again, len);
                assert_eq!(
                    data_pointer(&again, len),
                    Ok(DataPointer::InCapsule { len })
                );
            }
            Err(_) => {}
        }
    } else {
        assert!(msg.len() < 64 || msg.len() > max);
    }
    if let Ok(r) = ConnectRequest::parse(msg, 128, 16) {
        assert!(r.qid <= 16 && (1..128).contains(&r.hsqsize) && (1..=128).contains(&r.hrqsize));
        assert_eq!(ConnectRequest::parse(&r.encode(), 128, 16), Ok(r));
    }
}

/// Inputs for [`rdma_capsule`]: a keyed Read, an in-capsule Write, a Connect with keyed
/// data, and a connect request's private data.
pub fn rdma_capsule_seeds() -> Vec<Vec<u8>> {
    use nvme_spec::fabrics::sgl_id;
    use zerocopy::IntoBytes;
    let mut out = Vec::new();
    let mut read = nvme_spec::Submission::default();
    read.opcode = 0x02;
    read.flags = 0x40;
    read.prp1 = 0x7f00_1000.into();
    read.prp2 = ((u64::from(sgl_id::KEYED_INVALIDATE) << 56) | (0x1234 << 24) | 4096).into();
    out.push([&[0u8][..], read.as_bytes()].concat());
    let mut write = read;
    write.opcode = 0x01;
    write.prp1 = 0.into();
    write.prp2 = ((u64::from(sgl_id::INCAPSULE) << 56) | 512).into();
    out.push([&[0u8][..], write.as_bytes(), &[0xa5; 512]].concat());
    let mut connect = read;
    connect.opcode = nvme_spec::fabrics::OPCODE;
    connect.nsid = 1.into();
    connect.prp2 = ((u64::from(sgl_id::KEYED) << 56) | (7 << 24) | 1024).into();
    out.push([&[1u8][..], connect.as_bytes()].concat());
    let req = nvmeof::rdma::cm_records::ConnectRequest {
        qid: 1,
        hrqsize: 128,
        hsqsize: 127,
    };
    out.push([&[0u8][..], &req.encode()[..]].concat());
    out
}

/// What a volume store or an array reads back from its base or members, which may be a
/// remote target's namespace someone else can write: byte 0 picks the format, the rest is
/// its content. Checksums are made valid first, so the fields behind them are what gets
/// exercised. Decoding never panics; what decodes re-encodes to the same value; journal
/// records that decode apply to metadata with an error or not at all, never a panic.
pub fn member_metadata(data: &[u8]) {
    use volumes::lvol::codec::Reader;
    use volumes::lvol::meta::Meta;
    use volumes::lvol::records::Record;
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 4 {
        0 => {
            // an array member's superblock (version 1 or 2)
            use volumes::raid::Superblock;
            let mut b = vec![0u8; 4096];
            let n = rest.len().min(4096);
            b[..n].copy_from_slice(&rest[..n]);
            b[..8].copy_from_slice(b"VNVMRAID");
            b[8..12].copy_from_slice(&(1 + u32::from(mode >> 2 & 1)).to_le_bytes());
            b[12..16].fill(0);
            let crc = crc32c::crc32c(&b);
            b[12..16].copy_from_slice(&crc.to_le_bytes());
            if let Ok(sb) = Superblock::decode(&b) {
                assert_eq!(Superblock::decode(&sb.encode()).as_ref(), Ok(&sb));
            }
        }
        1 => {
            // one copy of a volume store's superblock
            use volumes::lvol::superblock::{SB_SIZE, Superblock};
            let mut b = vec![0u8; SB_SIZE];
            let n = rest.len().min(SB_SIZE);
            b[..n].copy_from_slice(&rest[..n]);
            b[..8].copy_from_slice(b"VNVMLVS1");
            b[12..16].fill(0);
            let crc = crc32c::crc32c(&b);
            b[12..16].copy_from_slice(&crc.to_le_bytes());
            if let Ok(sb) = Superblock::decode(&b) {
                let again = Superblock::decode(&sb.encode()).expect("re-encoded superblock");
                assert_eq!(again.encode(), sb.encode());
            }
        }
        2 => {
            // a checkpoint (its CRC is in the superblock: the content as it comes)
            let (cs, clusters, granules) = (1u64 << 20, 4096u64, 256u32);
            if let Ok(meta) = volumes::lvol::checkpoint::decode(rest, cs, clusters, granules) {
                let _ = meta.refcounts();
                let again = volumes::lvol::checkpoint::decode(
                    &volumes::lvol::checkpoint::encode(&meta),
                    cs,
                    clusters,
                    granules,
                )
                .expect("re-encoded checkpoint");
                assert_eq!(again, meta);
            }
        }
        _ => {
            // journal records, as a replay applies them in order
            let (clusters, granules) = (4096u64, 256u32);
            let mut meta = Meta::new(1 << 20, clusters, granules);
            let mut r = Reader::new(rest);
            while r.left() > 0 {
                let Ok(rec) = Record::decode(&mut r, clusters, granules) else {
                    break;
                };
                let _ = meta.apply(&rec);
            }
            let _ = meta.refcounts();
        }
    }
}

/// Seeds for [`member_metadata`]: a valid value of each format.
pub fn member_metadata_seeds() -> Vec<Vec<u8>> {
    use volumes::lvol::codec::Writer;
    use volumes::lvol::records::Record;
    use volumes::raid::superblock::{SlotInfo, SlotState};
    use volumes::raid::{DATA_OFFSET, Level, Superblock};
    let raid = Superblock {
        uuid: [7; 16],
        name: "r1".into(),
        level: Level::Raid1,
        strip: 65536,
        slot: 1,
        generation: 9,
        region_size: 1 << 20,
        data_offset: DATA_OFFSET,
        slots: vec![
            SlotInfo {
                state: SlotState::Active,
                data_size: 1 << 30,
                lost_gen: 0,
            },
            SlotInfo {
                state: SlotState::Active,
                data_size: 1 << 30,
                lost_gen: 4,
            },
        ],
        specs: vec![
            "file:/srv/a.img".into(),
            "nvme-tcp://10.0.0.2:4420/nqn.x:y/1".into(),
        ],
    };
    let mut out = vec![[&[4u8][..], &raid.encode()[..]].concat()];
    let geo = volumes::lvol::Geometry::plan(64 << 20, 1 << 20, None).expect("geometry");
    let lvs = volumes::lvol::superblock::Superblock {
        incompat: 0,
        compat: 0,
        generation: 3,
        uuid: [3; 16],
        name: "pool".into(),
        geometry: geo,
        active: 1,
        ckpt_bytes: 4096,
        ckpt_crc: 0x1234_5678,
        journal_seq: 77,
    };
    out.push([&[1u8][..], &lvs.encode()[..]].concat());
    let mut meta = volumes::lvol::meta::Meta::new(1 << 20, 4096, 256);
    let mut w = Writer::default();
    for rec in [
        Record::Create {
            id: 1,
            name: "v".into(),
            size: 8 << 20,
            thin: true,
        },
        Record::MapRun {
            id: 1,
            lcluster: 2,
            pcluster: 5,
            count: 3,
        },
        Record::Snapshot {
            src: 1,
            id: 2,
            name: "s".into(),
        },
        Record::Decouple {
            id: 1,
            thick: false,
        },
    ] {
        let _ = meta.apply(&rec);
        rec.encode(&mut w);
    }
    out.push([&[3u8][..], &w.0[..]].concat());
    out.push([&[2u8][..], &volumes::lvol::checkpoint::encode(&meta)[..]].concat());
    out
}
