//! The file backend: a namespace in a regular file or block device, driven through io_uring
//! (batched: one `io_uring_enter` per poll, not per request). Aligned requests go through an
//! `O_DIRECT` descriptor when the file system allows it, others through a buffered one.
//! FUA writes use `RWF_DSYNC`; Flush is `fdatasync` on the ring (`IORING_OP_FSYNC`). Write
//! Zeroes is a `fallocate` (`FALLOC_FL_ZERO_RANGE`) on the ring, Deallocate one that punches
//! a hole (`FALLOC_FL_PUNCH_HOLE`, the blocks are freed); where the file system refuses
//! either, the next in that order is used, down to writing zeroes on the ring from a shared
//! read-only zero buffer, one chunk after the other. Without io_uring (kernel refuses it),
//! requests are served synchronously with preadv/pwritev/fallocate.

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
    /// Of those, run by io_uring in a kernel worker thread.
    in_worker: usize,
    sync_done: DoneQueue,
    /// Requests on the ring, indexed by io_uring user_data: the caller's tag (any 64-bit
    /// value: a shared backend folds its user index into the top byte) and what to expect.
    slots: Vec<RingSlot>,
    free_slots: Vec<u32>,
    /// Ring slots whose Write Zeroes goes on with a (next) write of zeroes, reused.
    zero_next: Vec<u32>,
    /// The file system refused `FALLOC_FL_ZERO_RANGE`: Write Zeroes writes zeroes at once.
    no_zero_range: bool,
    /// The file system refused `FALLOC_FL_PUNCH_HOLE`: Deallocate zeroes at once.
    no_punch_hole: bool,
}

/// One request on the ring.
#[derive(Clone, Copy, Debug)]
struct RingSlot {
    tag: u64,
    kind: SlotKind,
    /// io_uring runs it in a kernel worker thread (fsync, fallocate, a synchronous write):
    /// see [`sys_util::yield_hint`].
    in_worker: bool,
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
    /// Deallocate as `fallocate(FALLOC_FL_PUNCH_HOLE)` of `len` bytes at `offset`.
    PunchHole { offset: u64, len: u64 },
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
            in_worker: 0,
            sync_done: DoneQueue::default(),
            slots: Vec::new(),
            free_slots: Vec::new(),
            zero_next: Vec::new(),
            no_zero_range: false,
            no_punch_hole: false,
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
                // zeroed by `zero_sync` in `submit`, never sent here
                IoOp::WriteZeroes { .. } | IoOp::Deallocate { .. } => {
                    return Status::INTERNAL_ERROR;
                }
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

    /// Put ring slot `ud`'s `fallocate` (a `ZeroRange` or `PunchHole`) on the ring.
    fn push_fallocate(&mut self, ud: u32) -> Result<(), Status> {
        let Some(slot) = self.slots.get(ud as usize) else {
            return Err(Status::INTERNAL_ERROR);
        };
        let (offset, len, mode) = match slot.kind {
            SlotKind::ZeroRange { offset, len } => (offset, len, libc::FALLOC_FL_ZERO_RANGE),
            SlotKind::PunchHole { offset, len } => (
                offset,
                len,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            ),
            _ => return Err(Status::INTERNAL_ERROR),
        };
        let entry = opcode::Fallocate::new(types::Fd(self.buffered.as_raw_fd()), len)
            .offset(offset)
            .mode(mode)
            .build()
            .user_data(u64::from(ud));
        // SAFETY: no memory is involved.
        unsafe { self.push(&entry) }
    }

    /// A ring slot for `slot` (reused; grows only past the deepest queue seen so far).
    /// Ring slot `ud`'s request is over.
    fn release(&mut self, ud: u32) {
        self.in_worker -= usize::from(self.slots[ud as usize].in_worker);
        self.free_slots.push(ud);
        self.in_flight -= 1;
    }

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

impl FileBackend {
    /// Zero `len` bytes at `offset` now (no io_uring, or nothing to zero): punch a hole
    /// when `punch` (Deallocate), else or where that is refused `FALLOC_FL_ZERO_RANGE`,
    /// else write zeroes.
    fn zero_sync(&mut self, offset: u64, len: u64, punch: bool) -> Result<(), Status> {
        if len == 0 {
            return Ok(());
        }
        let fd = self.buffered.as_raw_fd();
        let modes = [
            (
                punch,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            ),
            (true, libc::FALLOC_FL_ZERO_RANGE),
        ];
        for (_, mode) in modes.into_iter().filter(|m| m.0) {
            // SAFETY: fallocate on our own descriptor; no memory is involved.
            if unsafe { libc::fallocate(fd, mode, offset as i64, len as i64) } == 0 {
                return Ok(());
            }
        }
        let zero = zeroes();
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(zero.len() as u64) as usize;
            std::os::unix::fs::FileExt::write_all_at(&self.buffered, &zero[..n], pos)
                .map_err(|_| Status::WRITE_FAULT)?;
            pos += n as u64;
        }
        Ok(())
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
        let zeroes = match req.op {
            IoOp::WriteZeroes { len } => Some((len, false)),
            IoOp::Deallocate { len } => Some((len, true)),
            _ => None,
        };
        if self.ring.is_none() || zeroes.is_some_and(|(len, _)| len == 0) {
            let st = match zeroes {
                Some((len, punch)) => self
                    .zero_sync(req.offset, len, punch)
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
            _ => buffered,
        };
        let n = req.iov.segment_count() as u32;
        // SAFETY: only the kernel accesses the memory, until the completion is reaped in
        // poll(), which is when the request is reported complete; the iovec array is the
        // controller's command slot's (or the submitter's), kept until then as well
        // (GuestBuffers' contract, see `as_raw_iovecs`).
        let iov = unsafe { req.iov.as_raw_iovecs() }.as_ptr();
        let (offset, end) = (req.offset, req.offset + len);
        let kind = match req.op {
            IoOp::Read | IoOp::Write { .. } => SlotKind::Transfer { expect: len },
            IoOp::Flush => SlotKind::Flush,
            IoOp::Deallocate { .. } if !self.no_punch_hole => SlotKind::PunchHole { offset, len },
            _ if !self.no_zero_range => SlotKind::ZeroRange { offset, len },
            _ => SlotKind::ZeroWrite {
                at: offset,
                chunk: 0,
                end,
            },
        };
        let in_worker = matches!(req.op, IoOp::Write { fua: true })
            || matches!(
                kind,
                SlotKind::Flush | SlotKind::ZeroRange { .. } | SlotKind::PunchHole { .. }
            );
        let ud = self.take_slot(RingSlot {
            tag: req.tag,
            kind,
            in_worker,
        });

        let pushed = match kind {
            SlotKind::Transfer { .. } | SlotKind::Flush => {
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
            SlotKind::ZeroWrite { .. } => self.push_zero_write(ud as u32),
            SlotKind::ZeroRange { .. } | SlotKind::PunchHole { .. } => {
                self.push_fallocate(ud as u32)
            }
        };
        if let Err(s) = pushed {
            self.free_slots.push(ud as u32);
            return Err(s);
        }
        self.in_flight += 1;
        self.in_worker += usize::from(in_worker);
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
                SlotKind::Flush | SlotKind::ZeroRange { .. } | SlotKind::PunchHole { .. } => {
                    (0, Status::WRITE_FAULT)
                }
                SlotKind::ZeroWrite { chunk, .. } => (chunk, Status::WRITE_FAULT),
            };
            let ok = res >= 0 && res as u64 == expect;
            let unsupported =
                res == -i64::from(libc::EOPNOTSUPP) || res == -i64::from(libc::EINVAL);
            match slot.kind {
                SlotKind::PunchHole { offset, len } if !ok && unsupported => {
                    // no PUNCH_HOLE here: Deallocate zeroes instead, from now on at once
                    if !self.no_punch_hole {
                        log::info!(
                            "{}: no FALLOC_FL_PUNCH_HOLE ({res}); Deallocate zeroes",
                            self.path.display()
                        );
                    }
                    self.no_punch_hole = true;
                    slot.kind = if self.no_zero_range {
                        SlotKind::ZeroWrite {
                            at: offset,
                            chunk: 0,
                            end: offset + len,
                        }
                    } else {
                        SlotKind::ZeroRange { offset, len }
                    };
                    again.push(ud);
                    continue;
                }
                SlotKind::ZeroRange { offset, len } if !ok && unsupported => {
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
            let (tag, in_worker) = (slot.tag, slot.in_worker);
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
            // `release`, field by field: the ring is borrowed
            self.in_worker -= usize::from(in_worker);
            self.free_slots.push(ud);
            self.in_flight -= 1;
            n += 1;
            done(tag, st);
        }
        // Write Zeroes and Deallocates going on: their next step, sent now
        for ud in again.drain(..) {
            let next = match self.slots[ud as usize].kind {
                SlotKind::ZeroWrite { .. } => self.push_zero_write(ud),
                _ => self.push_fallocate(ud),
            };
            if let Err(st) = next {
                let tag = self.slots[ud as usize].tag;
                self.release(ud);
                n += 1;
                done(tag, st);
            }
        }
        self.zero_next = again;
        if n == 0 && self.in_worker > 0 {
            sys_util::yield_hint::request();
        }
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::GuestBuffers;

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
            Err(FileError::Missing { .. })
        ));
        std::fs::write(dir.join("odd"), [0u8; 1000]).unwrap();
        assert!(matches!(
            FileBackend::open(&dir.join("odd"), None),
            Err(FileError::BadSize { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A Flush runs in io_uring's kernel worker: each poll that finds it still running asks
    /// the polling thread to yield (the worker may need this core); reads and writes do not.
    #[test]
    fn a_flush_in_a_kernel_worker_asks_the_poll_loop_to_yield() {
        let dir = std::env::temp_dir().join(format!("vnvme-file-hint-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut b = FileBackend::open(&dir.join("ns.img"), Some(1 << 20)).unwrap();
        assert!(b.ring.is_some(), "no io_uring here");
        let _ = sys_util::yield_hint::take();
        let empty: [libc::iovec; 0] = [];
        for op in [IoOp::Flush, IoOp::Write { fua: true }] {
            b.submit(&IoRequest {
                tag: 1,
                op,
                offset: 0,
                // SAFETY: no buffers.
                iov: unsafe { GuestBuffers::from_raw_iovecs(&empty) },
            })
            .unwrap();
            let (mut got, mut waiting_polls, mut hints) = (Vec::new(), 0, 0);
            while got.is_empty() {
                let n = b.poll(&mut |t, s| got.push((t, s)));
                waiting_polls += usize::from(n == 0);
                hints += usize::from(sys_util::yield_hint::take());
            }
            assert_eq!(got, [(1, Status::SUCCESS)], "{op:?}");
            assert_eq!(
                hints, waiting_polls,
                "{op:?}: a hint for each poll that waited"
            );
            if op == IoOp::Flush {
                // io_uring has no non-blocking fsync: the worker takes a while
                assert!(waiting_polls > 0, "the Flush completed at its submission");
            }
            assert_eq!(b.in_worker, 0);
        }
        // nothing in a worker: polls that find nothing ask for nothing
        let mut data = [0u8; 4096];
        let iov = [libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: 4096,
        }];
        b.submit(&IoRequest {
            tag: 2,
            op: IoOp::Read,
            offset: 0,
            // SAFETY: `data` outlives the request, polled to completion below.
            iov: unsafe { GuestBuffers::from_raw_iovecs(&iov) },
        })
        .unwrap();
        let mut got = Vec::new();
        while got.is_empty() {
            b.poll(&mut |t, s| got.push((t, s)));
            assert!(!sys_util::yield_hint::take(), "a read asked for a yield");
        }
        for _ in 0..3 {
            b.poll(&mut |_, _| {});
            assert!(!sys_util::yield_hint::take());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Two Write Zeroes or Deallocates (`op` of a length) on the ring at once (one
    /// unaligned, through the buffered descriptor; one aligned), completed through poll with
    /// their full 64-bit tags; the bytes around them untouched.
    fn zero_two_ranges(b: &mut FileBackend, op: fn(u64) -> IoOp) {
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
                op: op(len),
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
            vec![(tags[0], Status::SUCCESS), (tags[1], Status::SUCCESS)],
            "{:?}",
            op(0)
        );
        assert_eq!(b.in_flight(), 0);
        let mut back = vec![1u8; size as usize];
        std::os::unix::fs::FileExt::read_exact_at(&b.buffered, &mut back, 0).unwrap();
        for (i, &x) in back.iter().enumerate() {
            let i = i as u64;
            let zeroed = ranges.iter().any(|&(o, l)| (o..o + l).contains(&i));
            assert_eq!(x, if zeroed { 0 } else { 0xff }, "{:?}: byte {i}", op(0));
        }
    }

    /// Write Zeroes, then Deallocate, on `b` as its flags stand.
    fn zero_both_ways(b: &mut FileBackend) {
        zero_two_ranges(b, |len| IoOp::WriteZeroes { len });
        zero_two_ranges(b, |len| IoOp::Deallocate { len });
    }

    #[test]
    fn write_zeroes_and_deallocate_complete_through_poll_whatever_the_file_system_offers() {
        let dir = std::env::temp_dir().join(format!("vnvme-file-wz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut b = FileBackend::open(&dir.join("ns.img"), Some(4 << 20)).unwrap();
        assert!(b.ring.is_some(), "io_uring is needed for this test");
        // FALLOC_FL_ZERO_RANGE and PUNCH_HOLE where the file system has them (ext4, xfs...)
        zero_both_ways(&mut b);
        assert!(!b.no_punch_hole && !b.no_zero_range);
        // as on a file system without PUNCH_HOLE: Deallocate zeroes the range
        b.no_punch_hole = true;
        zero_both_ways(&mut b);
        // and without either: writes of zeroes, chunk after chunk
        b.no_zero_range = true;
        zero_both_ways(&mut b);
        drop(b);
        std::fs::remove_dir_all(&dir).unwrap();
        // tmpfs refuses FALLOC_FL_ZERO_RANGE (EOPNOTSUPP): the fallback, found out on the ring
        let shm = Path::new("/dev/shm");
        if shm.is_dir() {
            let p = shm.join(format!("vnvme-file-wz-{}.img", std::process::id()));
            let mut b = FileBackend::open(&p, Some(4 << 20)).unwrap();
            zero_both_ways(&mut b);
            zero_both_ways(&mut b);
            drop(b);
            std::fs::remove_file(&p).unwrap();
        }
    }

    /// Deallocate frees the file's blocks (a hole), Write Zeroes need not; a Flush is an
    /// fsync on the ring and succeeds.
    #[test]
    fn deallocate_punches_a_hole_and_flush_goes_on_the_ring() {
        use std::os::unix::fs::MetadataExt;
        let dir = std::env::temp_dir().join(format!("vnvme-file-hole-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("ns.img");
        let mut b = FileBackend::open(&p, Some(4 << 20)).unwrap();
        let run = crate::backend::tests::run;
        let ones = vec![1u8; 4 << 20];
        assert_eq!(
            crate::backend::tests::write(&mut b, 0, &ones),
            Status::SUCCESS
        );
        assert_eq!(run(&mut b, IoOp::Flush, 0, None), Status::SUCCESS);
        let allocated = || std::fs::metadata(&p).unwrap().blocks() * 512;
        assert!(allocated() >= 4 << 20);
        let len = 3 << 20;
        assert_eq!(
            run(&mut b, IoOp::Deallocate { len }, 0, None),
            Status::SUCCESS
        );
        assert!(
            allocated() <= (1 << 20) + (64 << 10),
            "{} bytes allocated after deallocating 3 of 4 MiB",
            allocated()
        );
        let mut back = vec![1u8; 4 << 20];
        assert_eq!(
            crate::backend::tests::read(&mut b, 0, &mut back),
            Status::SUCCESS
        );
        assert!(back[..len as usize].iter().all(|&x| x == 0));
        assert!(back[len as usize..].iter().all(|&x| x == 1));
        assert_eq!(
            run(
                &mut b,
                IoOp::Deallocate { len: 8192 },
                (4 << 20) - 4096,
                None
            ),
            Status::LBA_OUT_OF_RANGE,
            "past the end"
        );
        drop(b);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
