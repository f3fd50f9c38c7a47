//! Unit-test harness: a controller polled by hand with its queues in a memfd, driven as a
//! guest driver does (registers, SQEs in memory, doorbells, CQEs read back), and a backend
//! that holds its requests until the test lets them go.

use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nvme_spec::Status;

use crate::backend::{Backend, GuestBufferList, IoOp, IoRequest, MallocBackend};
use crate::controller::{Controller, ControllerConfig};
use crate::doorbell::Doorbells;
use crate::memory::{GuestMemory, Protection};
use crate::namespace::Namespace;

/// Bytes of guest memory (one region at IOVA 0).
pub(crate) const MEM: u64 = 1 << 20;
const ASQ: u64 = 0x0;
const ACQ: u64 = 0x2000;
const IOSQ: u64 = 0x4000;
const IOCQ: u64 = 0x6000;
/// Entries of each queue.
pub(crate) const QSIZE: u32 = 128;
/// Guest memory free for the test's data: 0x10000 up to 1 MiB.
pub(crate) const DATA: u64 = 0x10000;

/// An SQE: opcode, NSID, PRP1 and CDW10.. (the CID is filled in on submission).
pub(crate) fn sqe(opcode: u8, nsid: u32, prp1: u64, cdws: &[u32]) -> [u8; 64] {
    let mut s = [0u8; 64];
    s[0] = opcode;
    s[4..8].copy_from_slice(&nsid.to_le_bytes());
    s[24..32].copy_from_slice(&prp1.to_le_bytes());
    for (i, v) in cdws.iter().enumerate() {
        s[40 + i * 4..44 + i * 4].copy_from_slice(&v.to_le_bytes());
    }
    s
}

/// One queue pair as the guest sees it.
#[derive(Default)]
struct Ring {
    tail: u32,
    head: u32,
    phase_flipped: bool,
}

/// A controller, enabled, with I/O queue pair 1 ([`QSIZE`] entries, no interrupts).
pub(crate) struct Harness {
    pub ctrl: Controller,
    pub mem: Arc<GuestMemory>,
    pub doorbells: Arc<Doorbells>,
    _fd: std::os::fd::OwnedFd,
    admin: Ring,
    io: Ring,
    cid: u16,
    /// The shadow doorbell page, once the test makes the I/O queue pair use it as Linux
    /// does (the host writes the shadow copies, never the registers).
    pub shadow_io: Option<u64>,
}

impl Harness {
    pub(crate) fn new(namespaces: Vec<Namespace>) -> Self {
        Self::build(namespaces, None)
    }

    /// As [`new`](Self::new), the controller keeping its state in `journal` from the start.
    pub(crate) fn with_journal(
        namespaces: Vec<Namespace>,
        journal: crate::journal::Journal,
    ) -> Self {
        Self::build(namespaces, Some(journal))
    }

    /// The configuration every harness controller has.
    pub(crate) fn config() -> ControllerConfig {
        ControllerConfig {
            serial: "HARNESS".into(),
            max_io_queues: 2,
            ..ControllerConfig::default()
        }
    }

    fn build(namespaces: Vec<Namespace>, journal: Option<crate::journal::Journal>) -> Self {
        let mem = Arc::new(GuestMemory::new());
        let fd = crate::memory::tests::memfd(MEM);
        let rw = Protection {
            read: true,
            write: true,
        };
        mem.map_fd(0, MEM, fd.as_fd(), 0, rw).unwrap();
        let doorbells = Arc::new(Doorbells::new().unwrap());
        let mut ctrl = Controller::new(
            Self::config(),
            Arc::clone(&mem),
            Arc::clone(&doorbells),
            namespaces,
        );
        if let Some(j) = journal {
            ctrl.attach_journal(j);
        }
        let mut h = Harness {
            ctrl,
            mem,
            doorbells,
            _fd: fd,
            admin: Ring::default(),
            io: Ring::default(),
            cid: 0,
            shadow_io: None,
        };
        h.enable();
        h
    }

    /// Enable with fresh admin queues and create I/O queue pair 1.
    pub(crate) fn enable(&mut self) {
        self.write(ASQ, &vec![0u8; 0x8000]);
        (self.admin, self.io) = (Ring::default(), Ring::default());
        let c = &mut self.ctrl;
        c.write_register(0x24, u64::from(((QSIZE - 1) << 16) | (QSIZE - 1)), 4);
        c.write_register(0x28, ASQ, 8);
        c.write_register(0x30, ACQ, 8);
        c.write_register(0x14, (6 << 16) | (4 << 20) | 1, 4);
        assert!(c.is_ready());
        self.create_io_queues();
    }

    /// Create I/O queue pair 1 ([`QSIZE`] entries, no interrupts).
    fn create_io_queues(&mut self) {
        let cq = self.admin(sqe(0x05, 0, IOCQ, &[((QSIZE - 1) << 16) | 1, 1]));
        assert_eq!(self.admin_wait(cq), Status::SUCCESS, "create I/O CQ");
        let sq = self.admin(sqe(
            0x01,
            0,
            IOSQ,
            &[((QSIZE - 1) << 16) | 1, (1 << 16) | 1],
        ));
        assert_eq!(self.admin_wait(sq), Status::SUCCESS, "create I/O SQ");
    }

    /// Delete I/O queue pair 1 and create it again with the same base and size (the ring
    /// starts over at entry 0, phase 1).
    pub(crate) fn recreate_io_queues(&mut self) {
        let sq = self.admin(sqe(0x00, 0, 0, &[1]));
        assert_eq!(self.admin_wait(sq), Status::SUCCESS, "delete I/O SQ");
        let cq = self.admin(sqe(0x04, 0, 0, &[1]));
        assert_eq!(self.admin_wait(cq), Status::SUCCESS, "delete I/O CQ");
        self.write(IOCQ, &vec![0u8; QSIZE as usize * 16]);
        self.io = Ring::default();
        self.create_io_queues();
    }

    pub(crate) fn write(&self, iova: u64, data: &[u8]) {
        self.mem.snapshot().write(iova, data).unwrap();
    }

    pub(crate) fn read(&self, iova: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.snapshot().read(iova, &mut v).unwrap();
        v
    }

    fn submit(&mut self, admin: bool, mut s: [u8; 64]) -> u16 {
        self.cid = self.cid.wrapping_add(1);
        s[2..4].copy_from_slice(&self.cid.to_le_bytes());
        let (base, ring, db) = if admin {
            (ASQ, &mut self.admin, 0)
        } else {
            (IOSQ, &mut self.io, 2)
        };
        let at = base + u64::from(ring.tail) * 64;
        ring.tail = (ring.tail + 1) % QSIZE;
        let tail = ring.tail;
        self.write(at, &s);
        self.ring(db, tail);
        self.cid
    }

    /// Write doorbell `db`: its register, or its shadow copy for the I/O queue pair once
    /// [`Self::shadow_io`] is set.
    fn ring(&self, db: usize, value: u32) {
        match self.shadow_io {
            Some(page) if db >= 2 => self.write(page + db as u64 * 4, &value.to_le_bytes()),
            _ => self.doorbells.store(db, value),
        }
    }

    /// Put an admin command on the queue; its CID.
    pub(crate) fn admin(&mut self, s: [u8; 64]) -> u16 {
        self.submit(true, s)
    }

    /// Put an I/O command on queue 1; its CID.
    pub(crate) fn io(&mut self, s: [u8; 64]) -> u16 {
        self.submit(false, s)
    }

    /// Poll the controller once and take the completions posted on queue `admin` or 1 as
    /// (CID, status).
    pub(crate) fn reap(&mut self, admin: bool) -> Vec<(u16, Status)> {
        self.ctrl.poll();
        self.posted(admin)
    }

    /// Take the completions posted on queue `admin` or 1 as (CID, status), without polling.
    pub(crate) fn posted(&mut self, admin: bool) -> Vec<(u16, Status)> {
        let (base, ring, db) = if admin {
            (ACQ, &mut self.admin, 1)
        } else {
            (IOCQ, &mut self.io, 3)
        };
        let mut got = Vec::new();
        loop {
            let mut e = [0u8; 16];
            self.mem
                .snapshot()
                .read(base + u64::from(ring.head) * 16, &mut e)
                .unwrap();
            let st = u16::from_le_bytes([e[14], e[15]]);
            if (st & 1 == 1) == ring.phase_flipped {
                break;
            }
            got.push((
                u16::from_le_bytes([e[12], e[13]]),
                Status::from_cqe_bits(st),
            ));
            ring.head = (ring.head + 1) % QSIZE;
            if ring.head == 0 {
                ring.phase_flipped = !ring.phase_flipped;
            }
        }
        if !got.is_empty() {
            let head = ring.head;
            self.ring(db, head);
        }
        got
    }

    /// Poll until `n` completions came on queue `admin` or 1 (5 s at most).
    pub(crate) fn wait(&mut self, admin: bool, n: usize) -> Vec<(u16, Status)> {
        let t = Instant::now();
        let mut got = Vec::new();
        while got.len() < n {
            assert!(t.elapsed() < Duration::from_secs(5), "only {got:?}");
            got.extend(self.reap(admin));
        }
        got
    }

    /// The status of admin command `cid`, the only one outstanding.
    pub(crate) fn admin_wait(&mut self, cid: u16) -> Status {
        let got = self.wait(true, 1);
        assert_eq!(got[0].0, cid);
        got[0].1
    }

    /// Run I/O command `s` alone; its status.
    pub(crate) fn io_run(&mut self, s: [u8; 64]) -> Status {
        let cid = self.io(s);
        let got = self.wait(false, 1);
        assert_eq!(got, [(cid, got[0].1)]);
        got[0].1
    }
}

/// Which ops a [`HeldBackend`] fails.
pub(crate) type FailWhen = fn(&IoOp) -> bool;

/// Shared view of a [`HeldBackend`]: whether it holds requests, what it was sent, and
/// the ops it fails.
#[derive(Default)]
pub(crate) struct HeldState {
    pub frozen: bool,
    /// Every op submitted, in order.
    pub log: Vec<IoOp>,
    /// Requests held now.
    pub held: usize,
    /// Most requests held at once.
    pub most_held: usize,
    /// Ops that complete with this status instead of running.
    pub fail: Option<(FailWhen, Status)>,
}

/// A RAM backend that holds every request while frozen (a stalled device or target) and
/// runs them once thawed.
pub(crate) struct HeldBackend {
    inner: MallocBackend,
    queue: Vec<(u64, IoOp, u64, GuestBufferList)>,
    pub state: Arc<Mutex<HeldState>>,
}

impl HeldBackend {
    pub(crate) fn new(size: u64) -> (Self, Arc<Mutex<HeldState>>) {
        let state = Arc::new(Mutex::new(HeldState::default()));
        let b = HeldBackend {
            inner: MallocBackend::new(size).unwrap(),
            queue: Vec::new(),
            state: Arc::clone(&state),
        };
        (b, state)
    }
}

impl Backend for HeldBackend {
    fn describe(&self) -> String {
        "held".into()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn submit(&mut self, req: &IoRequest<'_>) -> Result<(), Status> {
        let mut st = self.state.lock().unwrap();
        st.log.push(req.op);
        self.queue
            .push((req.tag, req.op, req.offset, GuestBufferList::of(req.iov)));
        st.held = self.queue.len();
        st.most_held = st.most_held.max(st.held);
        Ok(())
    }
    fn poll(&mut self, done: &mut dyn FnMut(u64, Status)) -> usize {
        let mut st = self.state.lock().unwrap();
        if st.frozen {
            return 0;
        }
        let mut n = 0;
        for (tag, op, offset, iov) in self.queue.drain(..) {
            if let Some((which, status)) = st.fail
                && which(&op)
            {
                done(tag, status);
                n += 1;
                continue;
            }
            let req = IoRequest {
                tag,
                op,
                offset,
                iov: iov.as_buffers(),
            };
            match self.inner.submit(&req) {
                Ok(()) => n += self.inner.poll(done),
                Err(s) => {
                    done(tag, s);
                    n += 1;
                }
            }
        }
        st.held = 0;
        n
    }
    fn in_flight(&self) -> usize {
        self.queue.len() + self.inner.in_flight()
    }
}
