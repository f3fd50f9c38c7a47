//! The file backend: a namespace in a regular file or block device, driven through io_uring
//! (batched: one `io_uring_enter` per poll, not per request). Aligned requests go through an
//! `O_DIRECT` descriptor when the file system allows it, others through a buffered one.
//! FUA writes use `RWF_DSYNC`; Flush is `fdatasync`. Write Zeroes is a `fallocate`
//! (`FALLOC_FL_ZERO_RANGE`) on the ring; where the file system refuses that, zeroes are
//! written on the ring from a shared read-only zero buffer, one chunk after the other.
//! Without io_uring (kernel refuses it), requests are served synchronously with
//! preadv/pwritev/fallocate.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use io_uring::{IoUring, opcode, squeue, types};
use nvme_spec::Status;

use super::{Backend, DoneQueue, IoOp, IoRequest, zeroes};

/// Alignment of buffer address, length and offset for the O_DIRECT path.
const DIRECT_ALIGN: u64 = 4096;
/// io_uring submission queue depth.
const RING_ENTRIES: u32 = 1024;

/// Errors opening a file namespace.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} does not exist (file:PATH:SIZE creates it)")]
    Missing { path: PathBuf },
    #[error("{path}: size {size} is not a multiple of 4096 or is zero")]
    BadSize { path: PathBuf, size: u64 },
    #[error("{path}: cannot set size to {size}: {source}")]
    Resize {
        path: PathBuf,
        size: u64,
        source: std::io::Error,
    },
}

/// A namespace stored in a file.
pub struct FileBackend {
    path: PathBuf,
    buffered: File,
    direct: Option<File>,
    size: u64,
    ring: Option<IoUring>,
    unsubmitted: usize,
    in_flight: usize,
    sync_done: DoneQueue,
    /// Requests on the ring, indexed by io_uring user_data: the caller's tag (any 64-bit
    /// value: a shared backend folds its user index into the top byte) and what to expect.
    slots: Vec<RingSlot>,
    free_slots: Vec<u32>,
    /// Ring slots whose Write Zeroes goes on with a (next) write of zeroes, reused.
    zero_next: Vec<u32>,
    /// The file system refused `FALLOC_FL_ZERO_RANGE`: Write Zeroes writes zeroes at once.
    no_zero_range: bool,
}

/// One request on the ring.
#[derive(Clone, Copy, Debug)]
struct RingSlot {
    tag: u64,
    kind: SlotKind,
}

/// What a ring slot's request is, and what its completion must say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotKind {
    /// A read or write that must move `expect` bytes.
    Transfer { expect: u64 },
    /// `fdatasync`.
    Flush,
    /// Write Zeroes as `fallocate(FALLOC_FL_ZERO_RANGE)` of `len` bytes at `offset`.
    ZeroRange { offset: u64, len: u64 },
    /// Write Zeroes as writes from [`zeroes`]: `chunk` bytes at `at` on the ring, the
    /// range ends at `end`.
    ZeroWrite { at: u64, chunk: u64, end: u64 },
}

impl std::fmt::Debug for FileBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileBackend")
            .field("path", &self.path)
            .field("size", &self.size)
            .finish()
    }
}

impl FileBackend {
    /// Open (creating if needed) `path`; with `size`, a regular file is grown or shrunk to it.
    pub fn open(path: &Path, size: Option<u64>) -> Result<Self, FileError> {
        let open_err = |source| FileError::Open {
            path: path.to_owned(),
            source,
        };
        let buffered = OpenOptions::new()
            .read(true)
            .write(true)
            .create(size.is_some())
            .truncate(false)
            .open(path)
            .map_err(|source| match source.kind() {
                std::io::ErrorKind::NotFound if size.is_none() => FileError::Missing {
                    path: path.to_owned(),
                },
                _ => open_err(source),
            })?;
        let meta = buffered.metadata().map_err(open_err)?;
        let is_block = meta.file_type().is_block_device();
        let mut cur = if is_block {
            block_device_size(&buffered).map_err(open_err)?
        } else {
            meta.len()
        };
        if let Some(want) = size.filter(|&w| !is_block && w != cur) {
            buffered.set_len(want).map_err(|source| FileError::Resize {
                path: path.to_owned(),
                size: want,
                source,
            })?;
            cur = want;
        }
        if cur == 0 || cur % 4096 != 0 {
            return Err(FileError::BadSize {
                path: path.to_owned(),
                size: cur,
            });
        }
        let direct = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok();
        let ring = match IoUring::new(RING_ENTRIES) {
            Ok(r) => Some(r),
            Err(e) => {
                crate::warn_limited!(
                    "{}: io_uring unavailable ({e}); using synchronous I/O",
                    path.display()
                );
                None
            }
        };
        log::info!(
            "{}: {} bytes, O_DIRECT {}, io_uring {}",
            path.display(),
            cur,
            if direct.is_some() { "on" } else { "off" },
            if ring.is_some() { "on" } else { "off" }
        );
        Ok(Self {
            path: path.to_owned(),
            buffered,
            direct,
            size: cur,
            ring,
            unsubmitted: 0,
            in_flight: 0,
            sync_done: DoneQueue::default(),
            slots: Vec::new(),
            free_slots: Vec::new(),
            zero_next: Vec::new(),
            no_zero_range: false,
        })
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), Status> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Status::LBA_OUT_OF_RANGE),
        }
    }

    /// The descriptor to use: O_DIRECT when every piece is aligned.
    fn fd_for(&self, offset: u64, iov: super::GuestBuffers<'_>) -> i32 {
        let aligned = offset.is_multiple_of(DIRECT_ALIGN)
            && iov.segments().all(|(base, len)| {
                (base as u64).is_multiple_of(DIRECT_ALIGN)
                    && (len as u64).is_multiple_of(DIRECT_ALIGN)
            });
        match &self.direct {
            Some(d) if aligned => d.as_raw_fd(),
            _ => self.buffered.as_raw_fd(),
        }
    }

    fn submit_sync(req: &IoRequest<'_>, fd: i32) -> Status {
        let n = req.iov.segment_count() as i32;
        let off = req.offset as i64;
        // SAFETY: the iovecs describe valid memory for the request (GuestBuffers' contract),
        // only the kernel accesses it, and the call returns before the request completes;
        // fd is one of our open descriptors.
        let r = unsafe {
            let iov = req.iov.as_raw_iovecs().as_ptr();
            match req.op {
                IoOp::Read => libc::preadv(fd, iov, n, off),
                IoOp::Write { fua: false } => libc::pwritev(fd, iov, n, off),
                IoOp::Write { fua: true } => libc::pwritev2(fd, iov, n, off, libc::RWF_DSYNC),
                IoOp::Flush => libc::fdatasync(fd) as isize,
                // zeroed by `write_zeroes` in `submit`, never sent here
                IoOp::WriteZeroes { .. } => return Status::INTERNAL_ERROR,
            }
        };
        io_status(
            r as i64,
            if req.op == IoOp::Flush {
                0
            } else {
                req.iov.len()
            },
            req.op,
        )
    }
}

/// Map a syscall / io_uring result to an NVMe status.
fn io_status(res: i64, expect: u64, op: IoOp) -> Status {
    if res < 0 || (res as u64) != expect {
        crate::warn_limited!("file backend: {op:?} returned {res}, expected {expect}");
        return match op {
            IoOp::Read => Status::UNRECOVERED_READ_ERROR,
            _ => Status::WRITE_FAULT,
        };
    }
    Status::SUCCESS
}

fn block_device_size(f: &File) -> std::io::Result<u64> {
    let mut size = 0u64;
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    // SAFETY: ioctl writes one u64 into `size`.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), BLKGETSIZE64, &raw mut size) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(size)
    }
}

impl FileBackend {
    /// Put `entry` on the submission queue (sent by the next poll, or now if the queue is
    /// full).
    ///
    /// # Safety
    /// The memory `entry` points the kernel at must stay valid until its completion is
    /// reaped in poll().
    unsafe fn push(&mut self, entry: &squeue::Entry) -> Result<(), Status> {
        let Some(ring) = self.ring.as_mut() else {
            return Err(Status::INTERNAL_ERROR);
        };
        // SAFETY: the caller keeps the entry's memory valid until its completion is reaped.
        while unsafe { ring.submission().push(entry) }.is_err() {
            if ring.submit().is_err() {
                return Err(Status::INTERNAL_ERROR);
            }
            self.unsubmitted = 0;
        }
        self.unsubmitted += 1;
        Ok(())
    }

    /// Put the next write of zeroes of ring slot `ud`'s Write Zeroes on the ring (its kind
    /// is a `ZeroWrite` whose `at` is where to write next).
    fn push_zero_write(&mut self, ud: u32) -> Result<(), Status> {
        let Some(slot) = self.slots.get_mut(ud as usize) else {
            return Err(Status::INTERNAL_ERROR);
        };
        let SlotKind::ZeroWrite { at, end, .. } = slot.kind else {
            return Err(Status::INTERNAL_ERROR);
        };
        let zero = zeroes();
        let chunk = (end - at).min(zero.len() as u64);
        slot.kind = SlotKind::ZeroWrite { at, chunk, end };
        let aligned = at.is_multiple_of(DIRECT_ALIGN)
            && chunk.is_multiple_of(DIRECT_ALIGN)
            && (zero.as_ptr() as u64).is_multiple_of(DIRECT_ALIGN);
        let fd = match &self.direct {
            Some(d) if aligned => d.as_raw_fd(),
            _ => self.buffered.as_raw_fd(),
        };
        let entry = opcode::Write::new(types::Fd(fd), zero.as_ptr(), chunk as u32)
            .offset(at)
            .build()
            .user_data(u64::from(ud));
        // SAFETY: the zero buffer is static, read-only and never freed.
        unsafe { self.push(&entry) }
    }

    /// A ring slot for `slot` (reused; grows only past the deepest queue seen so far).
    fn take_slot(&mut self, slot: RingSlot) -> u64 {
        if let Some(i) = self.free_slots.pop() {
            self.slots[i as usize] = slot;
            u64::from(i)
        } else {
            self.slots.push(slot);
            (self.slots.len() - 1) as u64
        }
    }
}

impl Backend for FileBackend {
    fn describe(&self) -> String {
        format!("file:{}", self.path.display())
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn submit(&mut self, req: &IoRequest<'_>) -> Result<(), Status> {
        let len = req.len();
        self.check(req.offset, len)?;
        let zeroes_len = match req.op {
            IoOp::WriteZeroes { len } => Some(len),
            _ => None,
        };
        if self.ring.is_none() || zeroes_len == Some(0) {
            let st = match zeroes_len {
                Some(len) => self
                    .write_zeroes(req.offset, len)
                    .err()
                    .unwrap_or(Status::SUCCESS),
                None => Self::submit_sync(req, self.fd_for(req.offset, req.iov)),
            };
            self.sync_done.push(req.tag, st);
            return Ok(());
        }
        let buffered = self.buffered.as_raw_fd();
        let fd = match req.op {
            IoOp::Read | IoOp::Write { .. } => self.fd_for(req.offset, req.iov),
            IoOp::Flush | IoOp::WriteZeroes { .. } => buffered,
        };
        let n = req.iov.segment_count() as u32;
        // SAFETY: only the kernel accesses the memory, until the completion is reaped in
        // poll(), which is when the request is reported complete; the iovec array is the
        // controller's command slot's (or the submitter's), kept until then as well
        // (GuestBuffers' contract, see `as_raw_iovecs`).
        let iov = unsafe { req.iov.as_raw_iovecs() }.as_ptr();
        let kind = match req.op {
            IoOp::Read | IoOp::Write { .. } => SlotKind::Transfer { expect: len },
            IoOp::Flush => SlotKind::Flush,
            IoOp::WriteZeroes { .. } if self.no_zero_range => SlotKind::ZeroWrite {
                at: req.offset,
                chunk: 0,
                end: req.offset + len,
            },
            IoOp::WriteZeroes { .. } => SlotKind::ZeroRange {
                offset: req.offset,
                len,
            },
        };
        let ud = self.take_slot(RingSlot { tag: req.tag, kind });
        let pushed = match req.op {
            IoOp::Read | IoOp::Write { .. } | IoOp::Flush => {
                let entry = match req.op {
                    IoOp::Read => opcode::Readv::new(types::Fd(fd), iov, n)
                        .offset(req.offset)
                        .build(),
                    IoOp::Write { fua } => opcode::Writev::new(types::Fd(fd), iov, n)
                        .offset(req.offset)
                        .rw_flags(if fua { libc::RWF_DSYNC } else { 0 })
                        .build(),
                    _ => opcode::Fsync::new(types::Fd(fd))
                        .flags(types::FsyncFlags::DATASYNC)
                        .build(),
                };
                // SAFETY: the iovec array and the buffers it points to stay valid until this
                // request's completion is reaped in poll() (the controller keeps the command
                // slot until then).
                unsafe { self.push(&entry.user_data(ud)) }
            }
            IoOp::WriteZeroes { .. } if self.no_zero_range => self.push_zero_write(ud as u32),
            IoOp::WriteZeroes { .. } => {
                let entry = opcode::Fallocate::new(types::Fd(fd), len)
                    .offset(req.offset)
                    .mode(libc::FALLOC_FL_ZERO_RANGE)
                    .build()
                    .user_data(ud);
                // SAFETY: no memory is involved.
                unsafe { self.push(&entry) }
            }
        };
        if let Err(s) = pushed {
            self.free_slots.push(ud as u32);
            return Err(s);
        }
        self.in_flight += 1;
        Ok(())
    }
    fn poll(&mut self, done: &mut dyn FnMut(u64, Status)) -> usize {
        let mut n = self.sync_done.drain(done);
        let Some(ring) = self.ring.as_mut() else {
            return n;
        };
        if self.unsubmitted > 0 {
            if let Err(e) = ring.submit() {
                crate::warn_limited!("io_uring submit: {e}");
            } else {
                self.unsubmitted = 0;
            }
        }
        let mut again = std::mem::take(&mut self.zero_next);
        for cqe in ring.completion() {
            let ud = cqe.user_data() as u32;
            let Some(slot) = self.slots.get_mut(ud as usize) else {
                continue; // not ours: every entry we push carries a slot index
            };
            let res = i64::from(cqe.result());
            let (expect, fail) = match slot.kind {
                SlotKind::Transfer { expect } => (expect, Status::DATA_TRANSFER_ERROR),
                SlotKind::Flush | SlotKind::ZeroRange { .. } => (0, Status::WRITE_FAULT),
                SlotKind::ZeroWrite { chunk, .. } => (chunk, Status::WRITE_FAULT),
            };
            let ok = res >= 0 && res as u64 == expect;
            match slot.kind {
                SlotKind::ZeroRange { offset, len }
                    if !ok
                        && (res == -i64::from(libc::EOPNOTSUPP)
                            || res == -i64::from(libc::EINVAL)) =>
                {
                    // the file system (or the kernel's io_uring) has no ZERO_RANGE: write
                    // zeroes instead, on the ring too, from now on at once
                    if !self.no_zero_range {
                        log::info!(
                            "{}: no FALLOC_FL_ZERO_RANGE ({res}); Write Zeroes writes zeroes",
                            self.path.display()
                        );
                    }
                    self.no_zero_range = true;
                    slot.kind = SlotKind::ZeroWrite {
                        at: offset,
                        chunk: 0,
                        end: offset + len,
                    };
                    again.push(ud);
                    continue;
                }
                SlotKind::ZeroWrite { at, chunk, end } if ok && at + chunk < end => {
                    slot.kind = SlotKind::ZeroWrite {
                        at: at + chunk,
                        chunk: 0,
                        end,
                    };
                    again.push(ud);
                    continue;
                }
                _ => {}
            }
            let tag = slot.tag;
            let st = if ok {
                Status::SUCCESS
            } else {
                crate::warn_limited!(
                    "{}: {:?} returned {res}, expected {expect}",
                    self.path.display(),
                    slot.kind
                );
                fail
            };
            self.free_slots.push(ud);
            self.in_flight -= 1;
            n += 1;
            done(tag, st);
        }
        // Write Zeroes going on: their next write of zeroes, sent now
        for ud in again.drain(..) {
            if let Err(st) = self.push_zero_write(ud) {
                let tag = self.slots[ud as usize].tag;
                self.free_slots.push(ud);
                self.in_flight -= 1;
                n += 1;
                done(tag, st);
            }
        }
        self.zero_next = again;
        if self.unsubmitted > 0
            && let Some(ring) = self.ring.as_mut()
        {
            if let Err(e) = ring.submit() {
                crate::warn_limited!("io_uring submit: {e}");
            } else {
                self.unsubmitted = 0;
            }
        }
        n
    }
    fn in_flight(&self) -> usize {
        self.in_flight + self.sync_done.len()
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), Status> {
        self.check(offset, len)?;
        // SAFETY: fallocate on our own descriptor.
        let r = unsafe {
            libc::fallocate(
                self.buffered.as_raw_fd(),
                libc::FALLOC_FL_ZERO_RANGE,
                offset as i64,
                len as i64,
            )
        };
        if r == 0 {
            return Ok(());
        }
        // file systems without ZERO_RANGE: write zeroes
        let zeros = vec![0u8; 1 << 20];
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(zeros.len() as u64) as usize;
            std::os::unix::fs::FileExt::write_all_at(&self.buffered, &zeros[..n], pos)
                .map_err(|_| Status::WRITE_FAULT)?;
            pos += n as u64;
        }
        Ok(())
    }
    fn deallocate(&mut self, offset: u64, len: u64) -> Result<(), Status> {
        self.check(offset, len)?;
        // SAFETY: fallocate on our own descriptor.
        let r = unsafe {
            libc::fallocate(
                self.buffered.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as i64,
                len as i64,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            self.write_zeroes(offset, len)
        }
    }
    fn read_sync(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Status> {
        self.check(offset, buf.len() as u64)?;
        std::os::unix::fs::FileExt::read_exact_at(&self.buffered, buf, offset)
            .map_err(|_| Status::UNRECOVERED_READ_ERROR)
    }
    fn flush_sync(&mut self) -> Result<(), Status> {
        self.buffered.sync_data().map_err(|_| Status::WRITE_FAULT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_in_a_temp_file() {
        let dir = std::env::temp_dir().join(format!("vnvme-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("ns.img");
        let mut b = FileBackend::open(&p, Some(1 << 20)).unwrap();
        crate::backend::tests::exercise(&mut b);
        drop(b);
        assert!(matches!(
            FileBackend::open(&dir.join("missing"), None),
            Err(FileError::Open { .. })
        ));
        std::fs::write(dir.join("odd"), [0u8; 1000]).unwrap();
        assert!(matches!(
            FileBackend::open(&dir.join("odd"), None),
            Err(FileError::BadSize { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Two Write Zeroes on the ring at once (one unaligned, through the buffered
    /// descriptor; one aligned), completed through poll with their full 64-bit tags; the
    /// bytes around them untouched.
    fn zero_two_ranges(b: &mut FileBackend) {
        let size = b.size();
        std::os::unix::fs::FileExt::write_all_at(&b.buffered, &vec![0xffu8; size as usize], 0)
            .unwrap();
        let ranges = [(512u64, (2u64 << 20) + 1024), (3 << 20, 1 << 20)];
        let tags = [
            0xfe << 56 | 0x00ff_ffff_ffff_fff1,
            0xff << 56 | 0x00ff_ffff_ffff_fff2,
        ];
        for (&(offset, len), &tag) in ranges.iter().zip(&tags) {
            b.submit(&IoRequest {
                tag,
                op: IoOp::WriteZeroes { len },
                offset,
                iov: crate::dptr::GuestBuffers::EMPTY,
            })
            .unwrap();
        }
        assert_eq!(b.in_flight(), 2);
        let mut got = Vec::new();
        let t = std::time::Instant::now();
        while got.len() < 2 && t.elapsed() < std::time::Duration::from_secs(10) {
            b.poll(&mut |t, s| got.push((t, s)));
        }
        got.sort_unstable_by_key(|g| g.0);
        assert_eq!(
            got,
            vec![(tags[0], Status::SUCCESS), (tags[1], Status::SUCCESS)]
        );
        assert_eq!(b.in_flight(), 0);
        let mut back = vec![1u8; size as usize];
        b.read_sync(0, &mut back).unwrap();
        for (i, &x) in back.iter().enumerate() {
            let i = i as u64;
            let zeroed = ranges.iter().any(|&(o, l)| (o..o + l).contains(&i));
            assert_eq!(x, if zeroed { 0 } else { 0xff }, "byte {i}");
        }
    }

    #[test]
    fn write_zeroes_completes_through_poll_with_and_without_zero_range() {
        let dir = std::env::temp_dir().join(format!("vnvme-file-wz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut b = FileBackend::open(&dir.join("ns.img"), Some(4 << 20)).unwrap();
        assert!(b.ring.is_some(), "io_uring is needed for this test");
        // FALLOC_FL_ZERO_RANGE where the file system has it (ext4, xfs, ...)
        zero_two_ranges(&mut b);
        // as on a file system without it: writes of zeroes, chunk after chunk
        b.no_zero_range = true;
        zero_two_ranges(&mut b);
        drop(b);
        std::fs::remove_dir_all(&dir).unwrap();
        // tmpfs refuses FALLOC_FL_ZERO_RANGE (EOPNOTSUPP): the fallback, found out on the ring
        let shm = Path::new("/dev/shm");
        if shm.is_dir() {
            let p = shm.join(format!("vnvme-file-wz-{}.img", std::process::id()));
            let mut b = FileBackend::open(&p, Some(4 << 20)).unwrap();
            zero_two_ranges(&mut b);
            zero_two_ranges(&mut b);
            drop(b);
            std::fs::remove_file(&p).unwrap();
        }
    }
}
