//! Namespace backends: where a namespace's blocks live. Reads, writes, flushes and Write
//! Zeroes complete asynchronously (`submit` then `poll`); a write is acknowledged to the
//! guest only when its backend reports it done. Rare management operations (deallocate,
//! compare reads, format's zeroing) are synchronous.

// io_uring submissions that carry guest buffer addresses
#[allow(unsafe_code)]
mod file;
mod malloc;
mod null;
mod shared;

pub use file::{FileBackend, FileError};
pub use malloc::{MallocBackend, MallocError};
pub use null::NullBackend;
pub use shared::{SharedBackend, SharedSource};

pub use crate::dptr::{GuestBufferList, GuestBuffers};

use nvme_spec::Status;

pub use sys_util::{ZERO_CHUNK, zeroes};

/// The data-moving operation of an asynchronous request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoOp {
    /// Backend to guest memory.
    Read,
    /// Guest memory to backend; `fua` asks for it to be durable before completion.
    Write { fua: bool },
    /// Make all completed writes durable.
    Flush,
    /// Zero `len` bytes at the request's offset (NVM Write Zeroes); no guest buffers.
    WriteZeroes { len: u64 },
}

/// One asynchronous request. The memory `iov` describes stays valid until the request's
/// completion is polled (see [`GuestBuffers`]).
#[derive(Debug)]
pub struct IoRequest<'a> {
    /// Opaque tag handed back on completion.
    pub tag: u64,
    pub op: IoOp,
    /// Byte offset in the namespace.
    pub offset: u64,
    /// The command's guest buffers (empty for Flush and Write Zeroes).
    pub iov: GuestBuffers<'a>,
}

impl IoRequest<'_> {
    /// Bytes the request covers in the namespace: the buffers' length, or a Write Zeroes'
    /// length (0 for a Flush).
    pub fn len(&self) -> u64 {
        match self.op {
            IoOp::WriteZeroes { len } => len,
            _ => self.iov.len(),
        }
    }

    /// True when the request covers no bytes (a Flush).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A namespace's storage.
pub trait Backend: Send {
    /// A short description for logs, e.g. `malloc:256MiB`.
    fn describe(&self) -> String;
    /// Capacity in bytes.
    fn size(&self) -> u64;
    /// Start a request. An `Err` means it was not started and completes with that status.
    /// Every op, Write Zeroes included, completes through [`poll`](Self::poll): a backend
    /// whose zeroing is instant (RAM, nothing) may run [`write_zeroes`](Self::write_zeroes)
    /// here and queue its result (see [`Backend::zero_now`]); one that may wait on a device
    /// or a network must not.
    fn submit(&mut self, req: &IoRequest<'_>) -> Result<(), Status>;
    /// Hand every finished request to `done`; returns how many finished.
    fn poll(&mut self, done: &mut dyn FnMut(u64, Status)) -> usize;
    /// Requests started but not yet polled as done.
    fn in_flight(&self) -> usize;
    /// Zero `len` bytes at `offset` synchronously (Format NVM, and the instant backends'
    /// Write Zeroes).
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), Status>;
    /// The fallback for a Write Zeroes `submit` got, for backends whose zeroing is instant:
    /// zero now with [`write_zeroes`](Self::write_zeroes) and return the status to queue
    /// for the next [`poll`](Self::poll) (`None`: not a Write Zeroes).
    fn zero_now(&mut self, req: &IoRequest<'_>) -> Option<Status> {
        let IoOp::WriteZeroes { len } = req.op else {
            return None;
        };
        Some(
            self.write_zeroes(req.offset, len)
                .err()
                .unwrap_or(Status::SUCCESS),
        )
    }
    /// Deallocate `len` bytes at `offset` (DSM); reads of it return zeroes afterwards.
    fn deallocate(&mut self, offset: u64, len: u64) -> Result<(), Status> {
        self.write_zeroes(offset, len)
    }
    /// Read synchronously into `buf` (Compare).
    fn read_sync(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Status>;
    /// Make everything durable now (shutdown, controller reset).
    fn flush_sync(&mut self) -> Result<(), Status>;
    /// The guest's DMA map was dropped (device reset, client gone). A backend that mirrors
    /// guest memory into another device catches up now rather than at its next request.
    fn guest_memory_changed(&mut self) {}
}

/// A completion queue for synchronous backends: preallocated, no allocation per request
/// once warmed up.
#[derive(Debug, Default)]
pub(crate) struct DoneQueue {
    done: Vec<(u64, Status)>,
    scratch: Vec<(u64, Status)>,
}

impl DoneQueue {
    pub(crate) fn push(&mut self, tag: u64, status: Status) {
        self.done.push((tag, status));
    }
    pub(crate) fn len(&self) -> usize {
        self.done.len()
    }
    pub(crate) fn drain(&mut self, done: &mut dyn FnMut(u64, Status)) -> usize {
        std::mem::swap(&mut self.done, &mut self.scratch);
        let n = self.scratch.len();
        for (t, s) in self.scratch.drain(..) {
            done(t, s);
        }
        n
    }
}

#[cfg(test)]
#[allow(unsafe_code)] // test requests over local buffers
pub(crate) mod tests {
    use super::*;

    /// Write a pattern through `b`, read it back, check zeroes/deallocate; shared by backends.
    /// Write, read back, flush, zero: tags use all 64 bits (a shared backend folds its user
    /// index into the top byte), so a backend that packs tags into fewer bits fails here.
    pub(crate) fn exercise(b: &mut dyn Backend) {
        exercise_with_tags(b, 0xfe << 56 | 0x00ff_ffff_ffff_fff0);
    }

    /// [`exercise`] with tags `hi | 1..=3`.
    #[allow(non_snake_case)]
    pub(crate) fn exercise_with_tags(b: &mut dyn Backend, HI: u64) {
        let mut data = vec![0u8; 8192];
        for (i, x) in data.iter_mut().enumerate() {
            *x = (i * 7 + 3) as u8;
        }
        let wr = [libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: 8192,
        }];
        b.submit(&IoRequest {
            tag: HI | 1,
            op: IoOp::Write { fua: true },
            offset: 4096,
            // SAFETY: `data` outlives the request (polled to completion below) and is not
            // touched meanwhile.
            iov: unsafe { GuestBuffers::from_raw_iovecs(&wr) },
        })
        .unwrap();
        let mut got = Vec::new();
        while got.is_empty() {
            b.poll(&mut |t, s| got.push((t, s)));
        }
        assert_eq!(got, vec![(HI | 1, Status::SUCCESS)]);
        let mut back = vec![0u8; 8192];
        let rd = [
            libc::iovec {
                iov_base: back.as_mut_ptr().cast(),
                iov_len: 4096,
            },
            libc::iovec {
                iov_base: back[4096..].as_mut_ptr().cast(),
                iov_len: 4096,
            },
        ];
        b.submit(&IoRequest {
            tag: HI | 2,
            op: IoOp::Read,
            offset: 4096,
            // SAFETY: `back` outlives the request (polled to completion below) and is not
            // touched meanwhile.
            iov: unsafe { GuestBuffers::from_raw_iovecs(&rd) },
        })
        .unwrap();
        b.submit(&IoRequest {
            tag: HI | 3,
            op: IoOp::Flush,
            offset: 0,
            iov: GuestBuffers::EMPTY,
        })
        .unwrap();
        got.clear();
        while got.len() < 2 {
            b.poll(&mut |t, s| got.push((t, s)));
        }
        got.sort_by_key(|g| g.0);
        assert_eq!(
            got,
            vec![(HI | 2, Status::SUCCESS), (HI | 3, Status::SUCCESS)]
        );
        assert_eq!(back, data);
        b.write_zeroes(4096, 512).unwrap();
        let mut z = vec![1u8; 1024];
        b.read_sync(4096, &mut z).unwrap();
        assert!(z[..512].iter().all(|&x| x == 0));
        assert_eq!(&z[512..], &data[512..1024]);
        // Write Zeroes through submit/poll, with the full 64-bit tag
        b.submit(&IoRequest {
            tag: HI | 4,
            op: IoOp::WriteZeroes { len: 4096 },
            offset: 8192,
            iov: GuestBuffers::EMPTY,
        })
        .unwrap();
        got.clear();
        while got.is_empty() {
            b.poll(&mut |t, s| got.push((t, s)));
        }
        assert_eq!(got, vec![(HI | 4, Status::SUCCESS)]);
        let mut z = vec![1u8; 8192];
        b.read_sync(4096, &mut z).unwrap();
        assert_eq!(&z[..512], &[0u8; 512][..]);
        assert_eq!(&z[512..4096], &data[512..4096]);
        assert!(z[4096..].iter().all(|&x| x == 0), "async write zeroes");
        assert_eq!(b.in_flight(), 0);
        assert!(b.read_sync(b.size() - 512, &mut [0u8; 1024]).is_err());
    }
}
