//! A minimal NVMe host driver over rust-vmm's independent `vfio_user::Client`, for host-side
//! tests: guest memory is a memfd we DMA_MAP at IOVA 0, queues live in it, doorbells go
//! through the sparse-mmapped BAR0 page. Deliberately separate from the server's code.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use vfio_user::Client;

/// Guest memory size mapped for tests.
pub const MEM: u64 = 8 << 20;
const ASQ: u64 = 0x0;
const ACQ: u64 = 0x1000;
const QSIZE: u32 = 64;

/// A driver instance.
pub struct NvmeClient {
    pub client: Client,
    mem: *mut u8,
    _memfd: OwnedFd,
    doorbells: *mut u32,
    sq_tail: [u32; 2],
    cq_head: [u32; 2],
    phase: [bool; 2],
    next_cid: u16,
    /// Shadow doorbell page offset in our memory, once configured (Doorbell Buffer Config).
    shadow: Option<u64>,
    /// How doorbells are rung once a shadow page is configured.
    pub ring_mode: RingMode,
}

/// How the client rings doorbells when a shadow doorbell page is configured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingMode {
    /// Shadow copy, then the register when EventIdx asks for it (as Linux does).
    Auto,
    /// Shadow copy only.
    ShadowOnly,
    /// Register only (as Linux does for the admin queue).
    RegisterOnly,
}

/// A completion: dword 0 and the status field (SCT << 8 | SC, DNR in bit 14).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cqe {
    pub dw0: u32,
    pub status: u16,
}

impl Cqe {
    pub fn ok(&self) -> bool {
        self.status.trailing_zeros() >= 11 // SCT and SC both zero
    }
}

impl NvmeClient {
    /// Connect, map memory, enable the controller, create I/O queue pair 1.
    pub fn connect(sock: &Path) -> Self {
        let mut client = Client::new(sock).expect("vfio-user connect");
        let (memfd, mem) = crate::shared_memory::shared_memory(c"guest", MEM);
        client
            .dma_map(0, 0, MEM, memfd.as_raw_fd())
            .expect("dma map");
        let bar0 = client.region(0).expect("BAR0");
        assert_eq!(
            bar0.sparse_areas.len(),
            1,
            "doorbell page must be a sparse mmap area"
        );
        let area = bar0.sparse_areas[0];
        let fo = bar0.file_offset.as_ref().expect("BAR0 fd");
        // SAFETY: mapping the server's doorbell area as it advertised it; checked.
        let db = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                area.size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fo.file().as_raw_fd(),
                (fo.start() + area.offset) as i64,
            )
        };
        assert_ne!(db, libc::MAP_FAILED);
        let mut c = NvmeClient {
            client,
            mem,
            _memfd: memfd,
            doorbells: db.cast(),
            sq_tail: [0; 2],
            cq_head: [0; 2],
            phase: [true; 2],
            next_cid: 0,
            shadow: None,
            ring_mode: RingMode::Auto,
        };
        c.enable();
        c
    }

    pub fn reg_read32(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.client
            .region_read(0, off, &mut b)
            .expect("region read");
        u32::from_le_bytes(b)
    }

    pub fn reg_write32(&mut self, off: u64, v: u32) {
        self.client
            .region_write(0, off, &v.to_le_bytes())
            .expect("region write");
    }

    fn wait_csts(&mut self, rdy: bool) {
        let t = Instant::now();
        while (self.reg_read32(0x1c) & 1 == 1) != rdy {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "CSTS.RDY never became {rdy}"
            );
        }
    }

    /// Disable, program admin queues, enable, wait ready.
    pub fn enable(&mut self) {
        self.reg_write32(0x14, 0);
        self.wait_csts(false);
        self.mem_fill(0, 0x2000, 0);
        self.sq_tail = [0; 2];
        self.cq_head = [0; 2];
        self.phase = [true; 2];
        self.shadow = None;
        self.ring_mode = RingMode::Auto;
        self.reg_write32(0x24, ((QSIZE - 1) << 16) | (QSIZE - 1));
        self.client
            .region_write(0, 0x28, &ASQ.to_le_bytes())
            .unwrap();
        self.client
            .region_write(0, 0x30, &ACQ.to_le_bytes())
            .unwrap();
        self.reg_write32(0x14, (6 << 16) | (4 << 20) | 1);
        self.wait_csts(true);
    }

    pub fn mem_write(&mut self, off: u64, data: &[u8]) {
        assert!(off + data.len() as u64 <= MEM);
        // SAFETY: bounds checked against our mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.mem.add(off as usize), data.len());
        };
    }

    pub fn mem_read(&self, off: u64, out: &mut [u8]) {
        assert!(off + out.len() as u64 <= MEM);
        // SAFETY: bounds checked against our mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(self.mem.add(off as usize), out.as_mut_ptr(), out.len());
        };
    }

    pub fn mem_fill(&mut self, off: u64, len: usize, v: u8) {
        self.mem_write(off, &vec![v; len]);
    }

    /// Write a raw doorbell value to the register (index 2*qid for SQ tail, 2*qid+1 for CQ
    /// head).
    pub fn ring_register(&mut self, index: usize, value: u32) {
        // SAFETY: index within the 4 KiB doorbell page we mapped.
        unsafe { std::ptr::write_volatile(self.doorbells.add(index), value) };
    }

    /// Ring a doorbell the way a host with shadow doorbells does (Linux `nvme_dbbuf_update_and_check_event`):
    /// update the shadow copy, then write the register only if EventIdx asks for it, or
    /// always when no shadow page is configured; or as `ring_mode` says.
    pub fn ring(&mut self, index: usize, value: u32) {
        let Some(shadow) = self
            .shadow
            .filter(|_| self.ring_mode != RingMode::RegisterOnly)
        else {
            self.ring_register(index, value);
            return;
        };
        let off = shadow + index as u64 * 4;
        let mut old = [0u8; 4];
        self.mem_read(off, &mut old);
        let old = u32::from_le_bytes(old);
        self.mem_write(off, &value.to_le_bytes());
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let ei = self.event_idx(index);
        let need = (value as u16).wrapping_sub(ei as u16).wrapping_sub(1)
            < (value as u16).wrapping_sub(old as u16);
        if need && self.ring_mode == RingMode::Auto {
            self.ring_register(index, value);
        }
    }

    /// Doorbell Buffer Config with the shadow page at `shadow` and EventIdx at `shadow +
    /// 0x1000`; on success doorbells go through the shadow page.
    pub fn configure_shadow_doorbells(&mut self, shadow: u64) -> Cqe {
        self.mem_fill(shadow, 0x2000, 0);
        let c = self.submit(0, with_prp2(cmd(0x7c, 0, shadow, &[]), shadow + 0x1000));
        if c.ok() {
            self.shadow = Some(shadow);
        }
        c
    }

    /// The controller's EventIdx for doorbell `index` (0 when not configured).
    pub fn event_idx(&self, index: usize) -> u32 {
        let Some(shadow) = self.shadow else { return 0 };
        let mut b = [0u8; 4];
        self.mem_read(shadow + 0x1000 + index as u64 * 4, &mut b);
        u32::from_le_bytes(b)
    }

    /// The shadow copy of doorbell `index` (0 when not configured).
    pub fn shadow_value(&self, index: usize) -> u32 {
        let Some(shadow) = self.shadow else { return 0 };
        let mut b = [0u8; 4];
        self.mem_read(shadow + index as u64 * 4, &mut b);
        u32::from_le_bytes(b)
    }

    /// Submit a 64-byte command on queue `q` (0 admin, 1 I/O) and wait for its completion.
    pub fn submit(&mut self, q: usize, sqe: [u8; 64]) -> Cqe {
        let cid = self.submit_nowait(q, sqe);
        self.wait(q, cid, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("no completion for cid {cid} on queue {q}"))
    }

    /// Put a command on queue `q` and ring its doorbell; returns its command id.
    pub fn submit_nowait(&mut self, q: usize, mut sqe: [u8; 64]) -> u16 {
        let cid = self.next_cid;
        self.next_cid = self.next_cid.wrapping_add(1);
        sqe[2..4].copy_from_slice(&cid.to_le_bytes());
        let sq_base = if q == 0 { ASQ } else { 0x2000 };
        self.mem_write(sq_base + u64::from(self.sq_tail[q]) * 64, &sqe);
        self.sq_tail[q] = (self.sq_tail[q] + 1) % QSIZE;
        self.ring(2 * q, self.sq_tail[q]);
        cid
    }

    /// Completions posted on queue `q` and not yet consumed (peeked, not consumed).
    pub fn posted(&self, q: usize) -> u32 {
        let cq_base = if q == 0 { ACQ } else { 0x3000 };
        let (mut head, mut phase, mut n) = (self.cq_head[q], self.phase[q], 0);
        loop {
            let mut e = [0u8; 16];
            self.mem_read(cq_base + u64::from(head) * 16, &mut e);
            if (e[14] & 1 == 1) != phase || n == QSIZE {
                return n;
            }
            n += 1;
            head = (head + 1) % QSIZE;
            if head == 0 {
                phase = !phase;
            }
        }
    }

    /// Wait up to `timeout` until `count` completions are posted on queue `q`.
    pub fn wait_posted(&self, q: usize, count: u32, timeout: Duration) -> bool {
        let t = Instant::now();
        while self.posted(q) < count {
            if t.elapsed() > timeout {
                return false;
            }
            std::thread::yield_now();
        }
        true
    }

    /// Wait up to `timeout` for the next completion on queue `q`, which must be for `cid`.
    pub fn wait(&mut self, q: usize, cid: u16, timeout: Duration) -> Option<Cqe> {
        let cq_base = if q == 0 { ACQ } else { 0x3000 };
        let t = Instant::now();
        loop {
            let mut e = [0u8; 16];
            self.mem_read(cq_base + u64::from(self.cq_head[q]) * 16, &mut e);
            let status = u16::from_le_bytes([e[14], e[15]]);
            if (status & 1 == 1) == self.phase[q] {
                assert_eq!(
                    u16::from_le_bytes([e[12], e[13]]),
                    cid,
                    "completion for another command"
                );
                self.cq_head[q] = (self.cq_head[q] + 1) % QSIZE;
                if self.cq_head[q] == 0 {
                    self.phase[q] = !self.phase[q];
                }
                self.ring(2 * q + 1, self.cq_head[q]);
                return Some(Cqe {
                    dw0: u32::from_le_bytes([e[0], e[1], e[2], e[3]]),
                    status: status >> 1,
                });
            }
            if t.elapsed() > timeout {
                return None;
            }
            std::thread::yield_now();
        }
    }

    /// Create I/O CQ 1 and SQ 1 (after Set Features Number of Queues).
    pub fn create_io_queues(&mut self) {
        self.create_io_queues_with_irq(None);
    }

    /// As [`Self::create_io_queues`], with interrupts on MSI-X `vector` when given.
    pub fn create_io_queues_with_irq(&mut self, vector: Option<u16>) {
        assert!(
            self.submit(0, cmd(0x09, 0, 0, &[0x07, 0x0001_0001])).ok(),
            "two queue pairs"
        );
        self.mem_fill(0x2000, 0x2000, 0);
        assert!(
            self.submit(
                0,
                cmd(
                    0x05,
                    0,
                    0x3000,
                    &[
                        ((QSIZE - 1) << 16) | 1,
                        vector.map_or(1, |v| (u32::from(v) << 16) | 3)
                    ]
                )
            )
            .ok(),
            "create CQ"
        );
        assert!(
            self.submit(
                0,
                cmd(0x01, 0, 0x2000, &[((QSIZE - 1) << 16) | 1, (1 << 16) | 1])
            )
            .ok(),
            "create SQ"
        );
    }
}

/// An eventfd for MSI-X vector `vector` (VFIO_IRQ_SET_DATA_EVENTFD | ACTION_TRIGGER).
pub fn msix_eventfd(client: &mut Client, vector: u32) -> OwnedFd {
    // SAFETY: eventfd with no flags besides non-blocking; result checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    client
        .set_irqs(2, (1 << 2) | (1 << 5), vector, 1, &[fd.as_raw_fd()])
        .expect("SET_IRQS MSI-X");
    fd
}

/// Wait up to `timeout` for at least one interrupt on `fd`; returns how many were counted.
pub fn wait_interrupts(fd: &OwnedFd, timeout: Duration) -> u64 {
    let t = Instant::now();
    loop {
        let n = take_interrupts(fd);
        if n > 0 || t.elapsed() > timeout {
            return n;
        }
        std::thread::yield_now();
    }
}

/// Interrupts signalled on `fd` since the last call (0 if none).
pub fn take_interrupts(fd: &OwnedFd) -> u64 {
    let mut v = 0u64;
    // SAFETY: reading 8 bytes into a local u64 from a non-blocking eventfd we own.
    let n = unsafe { libc::read(fd.as_raw_fd(), (&raw mut v).cast(), 8) };
    if n == 8 { v } else { 0 }
}

/// Build an SQE: opcode, nsid, PRP1, cdw10.. values.
pub fn cmd(opcode: u8, nsid: u32, prp1: u64, cdws: &[u32]) -> [u8; 64] {
    let mut s = [0u8; 64];
    s[0] = opcode;
    s[4..8].copy_from_slice(&nsid.to_le_bytes());
    s[24..32].copy_from_slice(&prp1.to_le_bytes());
    for (i, v) in cdws.iter().enumerate() {
        s[40 + i * 4..44 + i * 4].copy_from_slice(&v.to_le_bytes());
    }
    s
}

/// Set PRP2 of an SQE.
pub fn with_prp2(mut s: [u8; 64], prp2: u64) -> [u8; 64] {
    s[32..40].copy_from_slice(&prp2.to_le_bytes());
    s
}
