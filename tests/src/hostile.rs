//! A hostile vfio-user client for the tenant-isolation tests (`host_hostile_client.rs`):
//! raw messages carrying any file descriptors (SCM_RIGHTS), half-sent messages, and a minimal
//! NVMe driver over guest memory the test owns, so it can shrink or unmap that memory while
//! the controller is using it. Written apart from the server's code and from `nvme_client`
//! (whose socket and memory sit behind rust-vmm's client, out of an attacker's reach).

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::nvme_client::{Cqe, cmd, with_prp2};

/// vfio-user command numbers (QEMU docs/interop/vfio-user.rst).
pub mod command {
    pub const VERSION: u16 = 1;
    pub const DMA_MAP: u16 = 2;
    pub const DMA_UNMAP: u16 = 3;
    pub const GET_REGION_INFO: u16 = 5;
    pub const SET_IRQS: u16 = 8;
    pub const REGION_READ: u16 = 9;
    pub const REGION_WRITE: u16 = 10;
}

/// Reply header flag: the request failed, `error` holds the errno.
pub const FLAG_ERROR: u32 = 1 << 5;
/// VFIO region and interrupt indexes.
pub const BAR0: u32 = 0;
pub const INTX: u32 = 0;
pub const MSIX: u32 = 2;
/// SET_IRQS flags: DATA_EVENTFD | ACTION_TRIGGER.
const IRQ_EVENTFD_TRIGGER: u32 = (1 << 2) | (1 << 5);
/// DMA_MAP flags: READ | WRITE.
const DMA_RW: u32 = 3;
/// BAR0 registers.
pub const REG_CC: u64 = 0x14;
pub const REG_CSTS: u64 = 0x1c;
const REG_AQA: u64 = 0x24;
const REG_ASQ: u64 = 0x28;
const REG_ACQ: u64 = 0x30;
/// CSTS bits.
pub const CSTS_RDY: u32 = 1;
pub const CSTS_CFS: u32 = 2;

/// A decoded reply.
#[derive(Debug)]
pub struct Reply {
    pub flags: u32,
    pub errno: u32,
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

impl Reply {
    /// The errno of an error reply; None when the request succeeded.
    pub fn error(&self) -> Option<i32> {
        (self.flags & FLAG_ERROR != 0).then_some(self.errno as i32)
    }
}

/// Send `data` with `fds` attached to its first byte (SCM_RIGHTS), the rest plainly.
#[allow(clippy::cast_ptr_alignment)] // CMSG_DATA is written with write_unaligned only
pub fn send_with_fds(sock: &UnixStream, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(size_of_val(fds) as u32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)]; // u64s: aligned for cmsghdr
    // SAFETY: msghdr is plain data; all zeroes is a valid empty message.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: the control buffer holds CMSG_SPACE(fds) bytes, so the first header and its
        // data fit; the fds are copied byte-wise (write_unaligned).
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&raw const msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(size_of_val(fds) as u32) as _;
            let p = libc::CMSG_DATA(c).cast::<RawFd>();
            for (i, fd) in fds.iter().enumerate() {
                std::ptr::write_unaligned(p.add(i), *fd);
            }
        }
    }
    // SAFETY: msg points at our iovec and control buffer, both alive for the call;
    // MSG_NOSIGNAL turns a closed peer into EPIPE instead of SIGPIPE.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &raw const msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    (&*sock).write_all(&data[n as usize..])
}

/// Receive into `buf` (some bytes) and any fds that came with them.
#[allow(clippy::cast_ptr_alignment)] // CMSG_DATA is read with read_unaligned only
fn recv_with_fds(sock: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cbuf = vec![0u64; 64]; // room for far more fds than any reply carries
    // SAFETY: msghdr is plain data; all zeroes is a valid empty message.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = cbuf.len() * 8;
    // SAFETY: msg points at our iovec and control buffer, both alive for the call.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &raw mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: walking the control buffer the kernel filled, with the libc CMSG macros; each
    // SCM_RIGHTS fd is new in this process and owned by us from here on.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&raw const msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / 4;
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            c = libc::CMSG_NXTHDR(&raw const msg, c);
        }
    }
    Ok((n as usize, fds))
}

/// A 16-byte vfio-user command header.
pub fn header(id: u16, command: u16, msg_size: u32) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..2].copy_from_slice(&id.to_le_bytes());
    h[2..4].copy_from_slice(&command.to_le_bytes());
    h[4..8].copy_from_slice(&msg_size.to_le_bytes());
    h
}

/// Little-endian bytes of a list of u32 fields.
pub fn le32(fields: &[u32]) -> Vec<u8> {
    fields.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A vfio-user connection that sends whatever the test asks, fds included.
#[derive(Debug)]
pub struct Raw {
    pub stream: UnixStream,
    next_id: u16,
    /// From the server's VERSION reply.
    pub max_msg_fds: usize,
    pub max_dma_maps: usize,
}

impl Raw {
    /// Connect and negotiate the version; the server's capabilities are kept.
    pub fn connect(sock: &Path) -> Self {
        Self::connect_within(sock, Duration::from_secs(10))
    }

    /// [`Raw::connect`], waiting up to `patience` for the server to answer VERSION (it
    /// serves one client at a time: a new one waits while the last one's reset finishes).
    /// Replies after that are awaited for 10 s.
    pub fn connect_within(sock: &Path, patience: Duration) -> Self {
        let stream =
            UnixStream::connect(sock).unwrap_or_else(|e| panic!("connect {}: {e}", sock.display()));
        stream.set_read_timeout(Some(patience)).unwrap();
        let mut raw = Raw {
            stream,
            next_id: 1,
            max_msg_fds: 0,
            max_dma_maps: 0,
        };
        let mut v = vec![0, 0, 0, 0]; // version 0.0
        v.extend_from_slice(b"{\"capabilities\":{\"max_msg_fds\":16}}\0");
        let r = raw.request(command::VERSION, &v, &[]);
        assert_eq!(r.error(), None, "VERSION refused");
        let json = String::from_utf8_lossy(&r.payload[4..]);
        let json: serde_json::Value = serde_json::from_str(json.trim_end_matches('\0'))
            .unwrap_or_else(|e| panic!("VERSION capabilities {json:?}: {e}"));
        let cap = |name: &str| {
            json["capabilities"][name]
                .as_u64()
                .unwrap_or_else(|| panic!("VERSION reply lacks {name}: {json}"))
                as usize
        };
        raw.max_msg_fds = cap("max_msg_fds");
        raw.max_dma_maps = cap("max_dma_maps");
        raw.stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        raw
    }

    /// Send one command with `fds`; returns its message id.
    pub fn send(&mut self, command: u16, payload: &[u8], fds: &[RawFd]) -> u16 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let mut m = header(id, command, (16 + payload.len()) as u32).to_vec();
        m.extend_from_slice(payload);
        send_with_fds(&self.stream, &m, fds).expect("send");
        id
    }

    /// Read the reply to message `id` (header, payload, fds).
    pub fn recv(&mut self, id: u16) -> Reply {
        self.try_recv(id).expect("reply")
    }

    /// Read the reply to message `id`; an error when its header did not come within the
    /// read timeout (WouldBlock) or the connection failed (the stream is then out of step).
    pub fn try_recv(&mut self, id: u16) -> io::Result<Reply> {
        let mut h = [0u8; 16];
        let mut got = 0;
        let mut fds = Vec::new();
        while got < 16 {
            let (n, mut f) = recv_with_fds(&self.stream, &mut h[got..])?;
            assert!(n > 0, "server closed the connection instead of replying");
            got += n;
            fds.append(&mut f);
        }
        assert_eq!(u16::from_le_bytes([h[0], h[1]]), id, "reply to another id");
        let size = u32::from_le_bytes(h[4..8].try_into().unwrap()) as usize;
        let mut payload = vec![0u8; size.saturating_sub(16)];
        self.stream.read_exact(&mut payload).expect("reply payload");
        Ok(Reply {
            flags: u32::from_le_bytes(h[8..12].try_into().unwrap()),
            errno: u32::from_le_bytes(h[12..16].try_into().unwrap()),
            payload,
            fds,
        })
    }

    /// Send a command and wait for its reply.
    pub fn request(&mut self, command: u16, payload: &[u8], fds: &[RawFd]) -> Reply {
        let id = self.send(command, payload, fds);
        self.recv(id)
    }

    /// DMA_MAP `[iova, iova + size)` read/write, backed by `fd` at `offset` (none: no fd).
    pub fn dma_map(
        &mut self,
        fd: Option<BorrowedFd<'_>>,
        offset: u64,
        iova: u64,
        size: u64,
    ) -> Reply {
        let mut p = le32(&[32, DMA_RW]);
        for v in [offset, iova, size] {
            p.extend_from_slice(&v.to_le_bytes());
        }
        let fds: Vec<RawFd> = fd.iter().map(AsRawFd::as_raw_fd).collect();
        self.request(command::DMA_MAP, &p, &fds)
    }

    /// DMA_UNMAP `[iova, iova + size)`.
    pub fn dma_unmap(&mut self, iova: u64, size: u64) -> Reply {
        let mut p = le32(&[24, 0]);
        p.extend_from_slice(&iova.to_le_bytes());
        p.extend_from_slice(&size.to_le_bytes());
        self.request(command::DMA_UNMAP, &p, &[])
    }

    /// SET_IRQS: `fds.len()` eventfd triggers on interrupt `index` from vector `start`.
    pub fn set_irqs(&mut self, index: u32, start: u32, fds: &[RawFd]) -> Reply {
        let p = le32(&[20, IRQ_EVENTFD_TRIGGER, index, start, fds.len() as u32]);
        self.request(command::SET_IRQS, &p, fds)
    }

    /// GET_REGION_INFO with room for the capabilities.
    pub fn region_info(&mut self, index: u32) -> Reply {
        let mut p = le32(&[256, 0, index, 0]);
        p.extend_from_slice(&[0u8; 16]);
        self.request(command::GET_REGION_INFO, &p, &[])
    }

    /// REGION_READ of `count` bytes; panics on an error reply.
    pub fn region_read(&mut self, region: u32, offset: u64, count: u32) -> Vec<u8> {
        let mut p = offset.to_le_bytes().to_vec();
        p.extend_from_slice(&le32(&[region, count]));
        let r = self.request(command::REGION_READ, &p, &[]);
        assert_eq!(r.error(), None, "REGION_READ {region}:{offset:#x}");
        r.payload[16..].to_vec()
    }

    /// REGION_WRITE; panics on an error reply.
    pub fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) {
        let id = self.send_region_write(region, offset, data);
        let r = self.recv(id);
        assert_eq!(r.error(), None, "REGION_WRITE {region}:{offset:#x}");
    }

    /// Send a REGION_WRITE without waiting for its reply; returns its message id.
    pub fn send_region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> u16 {
        let mut p = offset.to_le_bytes().to_vec();
        p.extend_from_slice(&le32(&[region, data.len() as u32]));
        p.extend_from_slice(data);
        self.send(command::REGION_WRITE, &p, &[])
    }

    pub fn read32(&mut self, offset: u64) -> u32 {
        u32::from_le_bytes(self.region_read(BAR0, offset, 4).try_into().unwrap())
    }

    pub fn write32(&mut self, offset: u64, v: u32) {
        self.region_write(BAR0, offset, &v.to_le_bytes());
    }

    pub fn write64(&mut self, offset: u64, v: u64) {
        self.region_write(BAR0, offset, &v.to_le_bytes());
    }
}

/// A fresh memfd of `size` bytes (not mapped).
pub fn memfd(name: &std::ffi::CStr, size: u64) -> OwnedFd {
    // SAFETY: memfd_create with a C string; result checked.
    let raw = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(raw >= 0, "memfd_create: {}", io::Error::last_os_error());
    // SAFETY: raw is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    set_len(fd.as_fd(), size).expect("ftruncate memfd");
    fd
}

/// ftruncate `fd` to `len` bytes.
pub fn set_len(fd: BorrowedFd<'_>, len: u64) -> io::Result<()> {
    // SAFETY: ftruncate on a descriptor we borrow, integer arguments.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A new eventfd (blocking, as a careless client creates it).
pub fn eventfd() -> OwnedFd {
    // SAFETY: eventfd with an initial count of 0; result checked.
    let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    assert!(raw >= 0, "eventfd: {}", io::Error::last_os_error());
    // SAFETY: raw is a fresh descriptor we own.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

/// A pipe: (read end, write end).
pub fn pipe() -> (OwnedFd, OwnedFd) {
    let mut p = [0; 2];
    // SAFETY: pipe2 fills the two-element array; result checked.
    assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both are fresh descriptors we own.
    unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) }
}

/// Guest memory the [`Guest`] maps at IOVA 0.
pub const GUEST_MEM: u64 = 256 << 10;
const ASQ: u64 = 0x0;
const ACQ: u64 = 0x1000;
/// A 4 KiB buffer for Identify data.
pub const IDENTIFY_BUF: u64 = 0x2000;
/// The PRP list of the write buffer.
const PRP_LIST: u64 = 0x3000;
/// 48 KiB the driver never touches, for the test's data buffers.
pub const DATA_BUF: u64 = 0x4000;
const IO_SQ: u64 = 0x10000;
const IO_CQ: u64 = 0x20000;
/// Another 48 KiB the driver never touches (after the I/O CQ).
pub const SPARE_BUF: u64 = 0x24000;
/// The buffer every write sends (64 KiB: slow enough to keep commands in flight).
pub const WRITE_BUF: u64 = 0x30000;
pub const WRITE_SIZE: u64 = 64 << 10;
const ADMIN_QSIZE: u32 = 64;
/// I/O queue entries: room for many commands in flight at once.
pub const IO_QSIZE: u32 = 1024;

/// A minimal NVMe driver over a [`Raw`] connection and a memfd the test holds: admin queue,
/// one I/O queue pair without interrupts, doorbells through the mmapped BAR0 page.
#[derive(Debug)]
pub struct Guest {
    pub raw: Raw,
    pub memfd: OwnedFd,
    /// The BAR0 fd the server handed out (its doorbell memfd).
    pub bar0_fd: OwnedFd,
    mem: *mut u8,
    doorbells: *mut u32,
    doorbell_len: usize,
    /// Set once the test has taken the memory away: our own view of it is gone too.
    memory_lost: bool,
    admin_tail: u32,
    admin_head: u32,
    admin_phase: bool,
    io_tail: u32,
    io_head: u32,
    io_phase: bool,
    next_cid: u16,
}

impl Drop for Guest {
    fn drop(&mut self) {
        // SAFETY: both mappings came from successful mmaps of these sizes and are unmapped once.
        unsafe {
            libc::munmap(self.mem.cast(), GUEST_MEM as usize);
            libc::munmap(self.doorbells.cast(), self.doorbell_len);
        }
    }
}

/// (file offset, size) of the sparse-mmap area of a BAR0 GET_REGION_INFO reply.
fn doorbell_area(info: &[u8]) -> (u64, u64) {
    let u32_at = |o: usize| u32::from_le_bytes(info[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(info[o..o + 8].try_into().unwrap());
    let (flags, cap) = (u32_at(4), u32_at(12) as usize);
    assert_ne!(flags & (1 << 2), 0, "BAR0 must be mmappable");
    assert!(
        cap >= 32 && info.len() >= cap + 32,
        "no sparse mmap capability"
    );
    assert_eq!(
        u16::from_le_bytes([info[cap], info[cap + 1]]),
        1,
        "sparse mmap"
    );
    assert!(u32_at(cap + 8) >= 1, "no sparse area");
    (u64_at(24) + u64_at(cap + 16), u64_at(cap + 24))
}

impl Guest {
    /// Connect, DMA_MAP [`GUEST_MEM`] bytes of a new memfd at IOVA 0, map the doorbell page
    /// and enable the controller with the admin queues in that memory.
    pub fn connect(sock: &Path) -> Self {
        Self::connect_within(sock, Duration::from_secs(10))
    }

    /// [`Guest::connect`], waiting up to `patience` for the server to take the connection
    /// (see [`Raw::connect_within`]).
    pub fn connect_within(sock: &Path, patience: Duration) -> Self {
        let mut raw = Raw::connect_within(sock, patience);
        let memfd = memfd(c"hostile-guest", GUEST_MEM);
        // SAFETY: a shared mapping of our own memfd of that size; checked.
        let mem = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                GUEST_MEM as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                memfd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(mem, libc::MAP_FAILED, "mmap guest memory");
        let r = raw.dma_map(Some(memfd.as_fd()), 0, 0, GUEST_MEM);
        assert_eq!(r.error(), None, "DMA_MAP guest memory");
        let mut info = raw.region_info(BAR0);
        assert_eq!(info.error(), None, "GET_REGION_INFO BAR0");
        let bar0_fd = info.fds.pop().expect("BAR0 region info carries an fd");
        let (offset, len) = doorbell_area(&info.payload);
        // SAFETY: mapping the doorbell area the server advertised, from the fd it sent; checked.
        let doorbells = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                bar0_fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        assert_ne!(doorbells, libc::MAP_FAILED, "mmap doorbells");
        let mut g = Guest {
            raw,
            memfd,
            bar0_fd,
            mem: mem.cast(),
            doorbells: doorbells.cast(),
            doorbell_len: len as usize,
            memory_lost: false,
            admin_tail: 0,
            admin_head: 0,
            admin_phase: true,
            io_tail: 0,
            io_head: 0,
            io_phase: true,
            next_cid: 0,
        };
        g.enable();
        g
    }

    /// CSTS.
    pub fn csts(&mut self) -> u32 {
        self.raw.read32(REG_CSTS)
    }

    /// CC.EN = 0 and wait up to `timeout` for CSTS.RDY = 0; true if it cleared.
    pub fn disable(&mut self, timeout: Duration) -> bool {
        self.raw.write32(REG_CC, 0);
        let t = Instant::now();
        while self.csts() & CSTS_RDY != 0 {
            if t.elapsed() > timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// Reset, program the admin queues, enable, wait for CSTS.RDY.
    pub fn enable(&mut self) {
        assert!(self.disable(Duration::from_secs(5)), "CSTS.RDY stuck at 1");
        self.mem_fill(ASQ, 0x2000, 0);
        self.mem_fill(IO_SQ, (IO_CQ - IO_SQ) as usize + IO_QSIZE as usize * 16, 0);
        const { assert!(WRITE_BUF + WRITE_SIZE <= GUEST_MEM) };
        const { assert!(DATA_BUF >= PRP_LIST + 0x1000 && DATA_BUF + 0xc000 <= IO_SQ) };
        const { assert!(SPARE_BUF >= IO_CQ + IO_QSIZE as u64 * 16) };
        const { assert!(SPARE_BUF + 0xc000 <= WRITE_BUF) };
        (
            self.admin_tail,
            self.admin_head,
            self.admin_phase,
            self.io_tail,
            self.io_head,
            self.io_phase,
        ) = (0, 0, true, 0, 0, true);
        self.raw
            .write32(REG_AQA, ((ADMIN_QSIZE - 1) << 16) | (ADMIN_QSIZE - 1));
        self.raw.write64(REG_ASQ, ASQ);
        self.raw.write64(REG_ACQ, ACQ);
        self.raw.write32(REG_CC, (6 << 16) | (4 << 20) | 1);
        let t = Instant::now();
        while self.csts() & CSTS_RDY == 0 {
            assert!(t.elapsed() < Duration::from_secs(5), "CSTS.RDY never set");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Write doorbell `index` (2*qid: SQ tail, 2*qid+1: CQ head) with any value.
    pub fn ring(&mut self, index: usize, value: u32) {
        assert!(index * 4 < self.doorbell_len);
        // SAFETY: index lies inside the doorbell mapping (checked above).
        unsafe { std::ptr::write_volatile(self.doorbells.add(index), value) };
    }

    /// Doorbell registers in the mapped page.
    pub fn doorbell_count(&self) -> usize {
        self.doorbell_len / 4
    }

    pub fn mem_write(&mut self, off: u64, data: &[u8]) {
        assert!(!self.memory_lost, "guest memory was taken away");
        assert!(off + data.len() as u64 <= GUEST_MEM);
        // SAFETY: bounds checked against our live mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.mem.add(off as usize), data.len());
        }
    }

    pub fn mem_read(&self, off: u64, out: &mut [u8]) {
        assert!(!self.memory_lost, "guest memory was taken away");
        assert!(off + out.len() as u64 <= GUEST_MEM);
        // SAFETY: bounds checked against our live mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(self.mem.add(off as usize), out.as_mut_ptr(), out.len());
        }
    }

    pub fn mem_fill(&mut self, off: u64, len: usize, v: u8) {
        self.mem_write(off, &vec![v; len]);
    }

    /// Shrink the guest memory file to nothing under the controller (a hostile client).
    /// Our own mapping of it is gone as well: the memory helpers refuse from here on.
    pub fn truncate_memory(&mut self) {
        self.memory_lost = true;
        set_len(self.memfd.as_fd(), 0).expect("the client may shrink its own memfd");
    }

    fn cid(&mut self) -> u16 {
        self.next_cid = self.next_cid.wrapping_add(1);
        self.next_cid
    }

    /// Put an admin command on the queue and ring; returns its command id.
    pub fn admin_nowait(&mut self, mut sqe: [u8; 64]) -> u16 {
        let cid = self.cid();
        sqe[2..4].copy_from_slice(&cid.to_le_bytes());
        self.mem_write(ASQ + u64::from(self.admin_tail) * 64, &sqe);
        self.admin_tail = (self.admin_tail + 1) % ADMIN_QSIZE;
        self.ring(0, self.admin_tail);
        cid
    }

    /// The next admin completion (must be `cid`'s), within `timeout`.
    pub fn admin_wait(&mut self, cid: u16, timeout: Duration) -> Option<Cqe> {
        let t = Instant::now();
        loop {
            let mut e = [0u8; 16];
            self.mem_read(ACQ + u64::from(self.admin_head) * 16, &mut e);
            let status = u16::from_le_bytes([e[14], e[15]]);
            if (status & 1 == 1) == self.admin_phase {
                assert_eq!(u16::from_le_bytes([e[12], e[13]]), cid, "completion order");
                self.admin_head = (self.admin_head + 1) % ADMIN_QSIZE;
                if self.admin_head == 0 {
                    self.admin_phase = !self.admin_phase;
                }
                self.ring(1, self.admin_head);
                return Some(Cqe {
                    dw0: u32::from_le_bytes(e[0..4].try_into().unwrap()),
                    status: status >> 1,
                });
            }
            if t.elapsed() > timeout {
                return None;
            }
            std::thread::yield_now();
        }
    }

    /// Submit an admin command and wait for its completion (panics after 5 s).
    pub fn admin(&mut self, sqe: [u8; 64]) -> Cqe {
        let cid = self.admin_nowait(sqe);
        self.admin_wait(cid, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("no completion for admin opcode {:#x}", sqe[0]))
    }

    /// Identify Controller into [`IDENTIFY_BUF`]; returns the serial number.
    pub fn identify_serial(&mut self) -> String {
        let c = self.admin(cmd(0x06, 0, IDENTIFY_BUF, &[1]));
        assert!(c.ok(), "Identify: {c:?}");
        let mut sn = [0u8; 20];
        self.mem_read(IDENTIFY_BUF + 4, &mut sn);
        String::from_utf8_lossy(&sn).trim_end().to_string()
    }

    /// One I/O queue pair (qid 1, [`IO_QSIZE`] entries, polled: no interrupt).
    pub fn create_io_queues(&mut self) {
        let c = self.admin(cmd(0x09, 0, 0, &[0x07, 0]));
        assert!(c.ok(), "Set Features Number of Queues: {c:?}");
        let c = self.admin(cmd(0x05, 0, IO_CQ, &[((IO_QSIZE - 1) << 16) | 1, 1]));
        assert!(c.ok(), "Create I/O CQ: {c:?}");
        let c = self.admin(cmd(
            0x01,
            0,
            IO_SQ,
            &[((IO_QSIZE - 1) << 16) | 1, (1 << 16) | 1],
        ));
        assert!(c.ok(), "Create I/O SQ: {c:?}");
        (self.io_tail, self.io_head, self.io_phase) = (0, 0, true);
    }

    /// Put `sqes` on the I/O queue (each gets a new command id), then ring its doorbell
    /// once; returns the command ids. Completions are consumed by [`Guest::io_reap`].
    pub fn io_submit(&mut self, sqes: &[[u8; 64]]) -> Vec<u16> {
        assert!(sqes.len() < IO_QSIZE as usize);
        let mut cids = Vec::with_capacity(sqes.len());
        for sqe in sqes {
            let mut sqe = *sqe;
            let cid = self.cid();
            sqe[2..4].copy_from_slice(&cid.to_le_bytes());
            self.mem_write(IO_SQ + u64::from(self.io_tail) * 64, &sqe);
            self.io_tail = (self.io_tail + 1) % IO_QSIZE;
            cids.push(cid);
        }
        self.ring(2, self.io_tail);
        cids
    }

    /// The I/O completions posted since the last call, as (command id, status without the
    /// phase bit); the CQ head doorbell follows.
    pub fn io_reap(&mut self) -> Vec<(u16, u16)> {
        let mut got = Vec::new();
        loop {
            let e = self.io_cq_entry(self.io_head);
            let status = u16::from_le_bytes([e[14], e[15]]);
            if (status & 1 == 1) != self.io_phase {
                break;
            }
            got.push((u16::from_le_bytes([e[12], e[13]]), status >> 1));
            self.io_head = (self.io_head + 1) % IO_QSIZE;
            if self.io_head == 0 {
                self.io_phase = !self.io_phase;
            }
        }
        if !got.is_empty() {
            self.ring(3, self.io_head);
        }
        got
    }

    /// Reap I/O completions until `n` have come or `timeout` has passed.
    pub fn io_wait(&mut self, n: usize, timeout: Duration) -> Vec<(u16, u16)> {
        let t = Instant::now();
        let mut got = Vec::new();
        while got.len() < n && t.elapsed() < timeout {
            let more = self.io_reap();
            if more.is_empty() {
                std::thread::sleep(Duration::from_micros(100));
            }
            got.extend(more);
        }
        got
    }

    /// The raw I/O completion queue entry `index` (to see what the controller posted there).
    pub fn io_cq_entry(&self, index: u32) -> [u8; 16] {
        assert!(index < IO_QSIZE);
        let mut e = [0u8; 16];
        self.mem_read(IO_CQ + u64::from(index) * 16, &mut e);
        e
    }

    /// Put `n` 64 KiB writes of [`WRITE_BUF`] to namespace 1 (512-byte blocks, 32 MiB or
    /// more) on the I/O queue, then ring its doorbell once: they are all queued together.
    /// Completions are not consumed.
    pub fn queue_writes(&mut self, n: u32) {
        assert!(n < IO_QSIZE, "the queue holds {} commands", IO_QSIZE - 1);
        let list: Vec<u8> = (1..WRITE_SIZE / 4096)
            .flat_map(|i| (WRITE_BUF + i * 4096).to_le_bytes())
            .collect();
        self.mem_write(PRP_LIST, &list);
        let blocks = (WRITE_SIZE / 512) as u32;
        for i in 0..n {
            let lba = (i * blocks) % (32 << 20 >> 9);
            let mut sqe = with_prp2(cmd(0x01, 1, WRITE_BUF, &[lba, 0, blocks - 1]), PRP_LIST);
            let cid = self.cid();
            sqe[2..4].copy_from_slice(&cid.to_le_bytes());
            self.mem_write(IO_SQ + u64::from(self.io_tail) * 64, &sqe);
            self.io_tail = (self.io_tail + 1) % IO_QSIZE;
        }
        self.ring(2, self.io_tail);
    }

    /// I/O completions posted so far since the queue was created (no wrap: fewer than
    /// [`IO_QSIZE`]), and how many of them failed.
    pub fn io_completions(&self) -> (u32, u32) {
        let statuses = self.io_statuses();
        let failed = statuses.iter().filter(|&&st| st != 0).count();
        (statuses.len() as u32, failed as u32)
    }

    /// The status fields (CQE dword 3 bits 31:17: SC, SCT, CRD, M, DNR) of the I/O
    /// completions posted so far, in order (no wrap, as [`Guest::io_completions`]).
    pub fn io_statuses(&self) -> Vec<u16> {
        let mut out = Vec::new();
        for i in 0..IO_QSIZE {
            let mut e = [0u8; 16];
            self.mem_read(IO_CQ + u64::from(i) * 16, &mut e);
            let status = u16::from_le_bytes([e[14], e[15]]);
            if status & 1 == 0 {
                break;
            }
            out.push(status >> 1);
        }
        out
    }

    /// Map the guest memory at IOVA 0 again (after the test unmapped it).
    pub fn remap(&mut self) -> Reply {
        self.raw.dma_map(Some(self.memfd.as_fd()), 0, 0, GUEST_MEM)
    }
}
