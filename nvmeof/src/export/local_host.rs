//! The target's view of the emulated controller it exports: it acts as the controller's
//! PCIe host, in process. Submission and completion rings and one data buffer per command
//! slot live in a memfd mapped into the controller's DMA map; commands are placed in the
//! rings and doorbells rung exactly as a guest driver would, so every command goes through
//! the controller's own handling (admin, NVM, namespaces, backends): one implementation,
//! two transports.
//!
//! Each slot's buffer is `slot_bytes` long; a command's data pointer is one SGL Data Block
//! descriptor of the length the host gave, so the controller fails a command whose own
//! transfer length is larger (as over any fabric) instead of reading past it.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use device_model::memory::{MemoryMap, Protection};
use device_model::{Doorbells, GuestMemory};
use nvme_spec::{Completion, Submission};
use zerocopy::{FromBytes, IntoBytes};

/// IOVA where the target's memory is mapped for the controller.
const BASE_IOVA: u64 = 0x1_0000_0000;
const PAGE: u64 = 4096;

/// Why the local host could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LocalHostError {
    #[error("memory for the target's queues: {0}")]
    Memory(std::io::Error),
    #[error("mapping the target's queues for the controller: {0:?}")]
    Map(device_model::memory::MapError),
}

/// Ring geometry of one queue pair and its slots.
#[derive(Clone, Copy, Debug)]
struct QueueLayout {
    sq: u64,
    cq: u64,
    /// First slot's buffer; slot `s` is at `data + s * slot_stride`.
    data: u64,
}

/// Per queue ring state.
#[derive(Debug, Default, Clone, Copy)]
struct Ring {
    size: u32,
    sq_tail: u32,
    cq_head: u32,
    phase: bool,
}

/// The rings and buffers of up to `queues` queue pairs of `depth` entries.
pub struct LocalHost {
    /// The DMA map the controller uses, with our memory in it.
    _mem: Arc<GuestMemory>,
    /// A snapshot holding our memory, kept (so mapped) as long as the host; all access is
    /// by copy, as the controller accesses the same bytes concurrently.
    map: Arc<MemoryMap>,
    doorbells: Arc<Doorbells>,
    queues: Vec<QueueLayout>,
    rings: Vec<Ring>,
    depth: u32,
    slot_bytes: usize,
    slot_stride: u64,
    total: u64,
    fd: OwnedFd,
}

impl std::fmt::Debug for LocalHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalHost")
            .field("queues", &self.queues.len())
            .field("depth", &self.depth)
            .finish_non_exhaustive()
    }
}

impl LocalHost {
    /// Memory for `queues` queue pairs (admin included) of `depth` entries each, with a
    /// `slot_bytes` buffer (a multiple of 4 KiB) per entry, mapped into `mem`.
    pub fn new(
        mem: Arc<GuestMemory>,
        doorbells: Arc<Doorbells>,
        queues: usize,
        depth: u32,
        slot_bytes: usize,
    ) -> Result<Self, LocalHostError> {
        let ring_bytes = u64::from(depth) * 64 + u64::from(depth) * 16;
        let ring_pages = ring_bytes.div_ceil(PAGE) * PAGE;
        let slot_stride = slot_bytes as u64;
        let per_queue = ring_pages + u64::from(depth) * slot_stride;
        let total = per_queue * queues as u64;
        let fd = sys_util::sealed_memfd(c"vnvme-tcp-target", total, false)
            .map_err(LocalHostError::Memory)?;
        let rw = Protection {
            read: true,
            write: true,
        };
        mem.map_fd(BASE_IOVA, total, fd.as_fd(), 0, rw)
            .map_err(LocalHostError::Map)?;
        let map = mem.snapshot();
        map.check_range(BASE_IOVA, total, true)
            .map_err(|e| LocalHostError::Memory(std::io::Error::other(format!("{e:?}"))))?;
        let mut layouts = Vec::with_capacity(queues);
        for q in 0..queues as u64 {
            let start = BASE_IOVA + q * per_queue;
            layouts.push(QueueLayout {
                sq: start,
                cq: start + u64::from(depth) * 64,
                data: start + ring_pages,
            });
        }
        let host = Self {
            _mem: mem,
            map,
            doorbells,
            queues: layouts,
            rings: vec![Ring::default(); queues],
            depth,
            slot_bytes,
            slot_stride,
            total,
            fd,
        };
        Ok(host)
    }

    /// Entries per queue (the most a host may ask for).
    pub fn depth(&self) -> u32 {
        self.depth
    }

    /// Bytes of data one command may move.
    pub fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }

    /// Queue pairs (admin included).
    pub fn queues(&self) -> usize {
        self.queues.len()
    }

    /// The memory holding the rings and buffers (for a transport to register).
    pub fn memory_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Bytes of that memory.
    pub fn memory_len(&self) -> usize {
        self.total as usize
    }

    /// Where `slot`'s buffer of queue `qid` is in that memory.
    pub fn slot_offset(&self, qid: u16, slot: u16) -> usize {
        (self.slot_iova(qid, slot) - BASE_IOVA) as usize
    }

    /// IOVAs of queue `qid`'s SQ and CQ rings.
    pub fn ring_iovas(&self, qid: u16) -> (u64, u64) {
        let l = self.queues[qid as usize];
        (l.sq, l.cq)
    }

    /// (Re)start queue `qid` with `size` entries: empty rings, phase 1.
    pub fn reset_queue(&mut self, qid: u16, size: u32) {
        self.rings[qid as usize] = Ring {
            size,
            sq_tail: 0,
            cq_head: 0,
            phase: true,
        };
        let l = self.queues[qid as usize];
        let n = self.depth as usize * 16;
        self.zero(l.cq, n);
    }

    fn slot_iova(&self, qid: u16, slot: u16) -> u64 {
        self.queues[qid as usize].data + u64::from(slot) * self.slot_stride
    }

    /// Copy `data` to our memory at `iova` (a range from the layout).
    fn write(&self, iova: u64, data: &[u8]) {
        self.map
            .write(iova, data)
            .expect("a range inside the target's own memory");
    }

    /// Copy our memory at `iova` (a range from the layout) into `out`.
    fn read(&self, iova: u64, out: &mut [u8]) {
        self.map
            .read(iova, out)
            .expect("a range inside the target's own memory");
    }

    /// Zero `len` bytes of our memory at `iova`.
    fn zero(&self, mut iova: u64, mut len: usize) {
        const ZEROES: [u8; 512] = [0; 512];
        while len > 0 {
            let n = len.min(ZEROES.len());
            self.write(iova, &ZEROES[..n]);
            iova += n as u64;
            len -= n;
        }
    }

    /// Copy `data` into the data buffer of `slot` of queue `qid` at byte `off`.
    pub fn write_slot(&self, qid: u16, slot: u16, off: usize, data: &[u8]) {
        assert!(
            off + data.len() <= self.slot_bytes,
            "inside the slot's buffer"
        );
        self.write(self.slot_iova(qid, slot) + off as u64, data);
    }

    /// Zero the first `len` bytes of the data buffer of `slot` of queue `qid`.
    pub fn zero_slot(&self, qid: u16, slot: u16, len: usize) {
        assert!(len <= self.slot_bytes, "inside the slot's buffer");
        self.zero(self.slot_iova(qid, slot), len);
    }

    /// Copy the first `out.len()` bytes of the data buffer of `slot` of queue `qid` to `out`.
    pub fn read_slot(&self, qid: u16, slot: u16, out: &mut [u8]) {
        assert!(out.len() <= self.slot_bytes, "inside the slot's buffer");
        self.read(self.slot_iova(qid, slot), out);
    }

    /// Point `sqe`'s data pointer at the first `len` bytes of the slot's buffer: one SGL
    /// Data Block descriptor (PSDT 01b).
    pub fn set_data(&self, sqe: &mut Submission, qid: u16, slot: u16, len: usize) {
        sqe.flags = (sqe.flags & 0x3) | 0x40;
        sqe.prp1 = self.slot_iova(qid, slot).into();
        // length in bytes 8..11, descriptor type Data Block (0) in byte 15
        sqe.prp2 = (len as u32 as u64).into();
    }

    /// Place `sqe` (its CID = the slot) in queue `qid`'s SQ; ring with [`ring`](Self::ring).
    pub fn push(&mut self, qid: u16, sqe: &Submission) {
        let r = self.rings[qid as usize];
        let at = self.queues[qid as usize].sq + u64::from(r.sq_tail) * 64;
        self.write(at, sqe.as_bytes());
        self.rings[qid as usize].sq_tail = (r.sq_tail + 1) % r.size;
    }

    /// Ring queue `qid`'s SQ tail doorbell.
    pub fn ring(&self, qid: u16) {
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        self.doorbells
            .store(2 * qid as usize, self.rings[qid as usize].sq_tail);
    }

    /// Take the completions posted to queue `qid`'s CQ and hand each to `f`; updates the CQ
    /// head doorbell. Returns how many.
    pub fn reap(&mut self, qid: u16, f: &mut dyn FnMut(Completion)) -> usize {
        let mut n = 0;
        loop {
            let r = self.rings[qid as usize];
            if r.size == 0 {
                return 0;
            }
            let at = self.queues[qid as usize].cq + u64::from(r.cq_head) * 16;
            let mut raw = [0u8; 16];
            self.read(at, &mut raw);
            let status = u16::from_le_bytes([raw[14], raw[15]]);
            if (status & 1 != 0) != r.phase {
                break;
            }
            std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
            self.read(at, &mut raw);
            let cqe = Completion::read_from_bytes(&raw).expect("16 bytes");
            let ring = &mut self.rings[qid as usize];
            ring.cq_head += 1;
            if ring.cq_head == ring.size {
                ring.cq_head = 0;
                ring.phase = !ring.phase;
            }
            f(cqe);
            n += 1;
        }
        if n > 0 {
            self.doorbells
                .store(2 * qid as usize + 1, self.rings[qid as usize].cq_head);
        }
        n
    }
}
