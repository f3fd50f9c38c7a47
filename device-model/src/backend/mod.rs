//! Namespace backends: where a namespace's blocks live. Every operation (read, write,
//! flush, Write Zeroes, deallocate) completes asynchronously (`submit` then `poll`), so a
//! slow backend never holds the reactor its controller shares with others; a write is
//! acknowledged to the guest only when its backend reports it done.

// io_uring submissions that carry guest buffer addresses
#[allow(unsafe_code)]
mod file;
mod malloc;
mod null;
mod shared;

pub use file::{FileBackend, FileError};
pub use malloc::{MallocBackend, MallocError};
mod written_pages;
pub use null::NullBackend;
pub use shared::{SharedBackend, SharedSource};

pub use crate::dptr::{GuestBufferList, GuestBuffers, IoBuffer};

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
    /// Deallocate `len` bytes at the request's offset (Dataset Management's Deallocate,
    /// NVM command set 1.0 §3.2.3; Format NVM): reads of them return zeroes afterwards, as
    /// Identify Namespace DLFEAT promises. No guest buffers.
    Deallocate { len: u64 },
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
    /// The command's guest buffers (empty for Flush, Write Zeroes and Deallocate).
    pub iov: GuestBuffers<'a>,
}

impl IoRequest<'_> {
    /// A Flush tagged `tag` (no range, no buffers).
    pub fn flush(tag: u64) -> Self {
        Self {
            tag,
            op: IoOp::Flush,
            offset: 0,
            iov: GuestBuffers::EMPTY,
        }
    }

    /// Bytes the request covers in the namespace: the buffers' length, or a Write Zeroes'
    /// or Deallocate's length (0 for a Flush).
    pub fn len(&self) -> u64 {
        match self.op {
            IoOp::WriteZeroes { len } | IoOp::Deallocate { len } => len,
            _ => self.iov.len(),
        }
    }

    /// True when the request covers no bytes (a Flush).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What [`Backend::execute`] did with a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Submitted {
    /// Started: its completion comes through [`Backend::poll`].
    Queued,
    /// Done, successfully; no poll reports it.
    Completed,
}

/// A namespace's storage.
pub trait Backend: Send {
    /// A short description for logs, e.g. `malloc:256MiB`.
    fn describe(&self) -> String;
    /// Capacity in bytes.
    fn size(&self) -> u64;
    /// Start a request. An `Err` means it was not started and completes with that status.
    /// Every op completes through [`poll`](Self::poll), never here: a backend whose work is
    /// instant (RAM, nothing) does it now and queues the status for the next poll; one that
    /// may wait on a file system, a device or a network must not wait here.
    fn submit(&mut self, req: &IoRequest<'_>) -> Result<(), Status>;
    /// Start a request, or, when this backend's work is instant (RAM, nothing), do it now:
    /// [`Submitted::Completed`] is then its successful completion, which no poll reports
    /// again (an `Err` is its failure, as for `submit`). What a controller's read and write
    /// call: the command completes in the pass that fetched it. The default submits.
    /// Backends built of backends call `submit`, which always completes through `poll`.
    fn execute(&mut self, req: &IoRequest<'_>) -> Result<Submitted, Status> {
        self.submit(req).map(|()| Submitted::Queued)
    }
    /// Hand every finished request to `done`; returns how many finished.
    fn poll(&mut self, done: &mut dyn FnMut(u64, Status)) -> usize;
    /// [`poll`](Self::poll) onto the end of `done`: what a controller's reap calls. A backend
    /// that keeps its finished requests in a list moves them over at once (no call per
    /// request); the default goes through `poll`.
    fn poll_into(&mut self, done: &mut Vec<(u64, Status)>) -> usize {
        self.poll(&mut |t, s| done.push((t, s)))
    }
    /// Requests started but not yet polled as done.
    fn in_flight(&self) -> usize;
    /// The largest Read or Write it takes in one request, when it has a limit of its own
    /// (a remote target's or a device's MDTS): the controller's MDTS is set no larger.
    fn max_transfer(&self) -> Option<u64> {
        None
    }
    /// The size, when it can change at run time (a volume resized under its namespace): a
    /// cell the backend keeps current, which wrappers (a shared namespace's handles) and
    /// listings read without a lock. `None` (the default): [`size`](Self::size) is fixed.
    fn live_size(&self) -> Option<std::sync::Arc<std::sync::atomic::AtomicU64>> {
        None
    }
    /// The guest's DMA map was dropped (device reset, client gone). A backend that mirrors
    /// guest memory into another device catches up now rather than at its next request.
    fn guest_memory_changed(&mut self) {}
    /// From now on this backend serves one controller whose guest memory is `guest` (an
    /// array handed to its namespace): a backend that maps guest memory for another device
    /// (an `nvme:` namespace) moves that controller's data zero-copy from then on, instead
    /// of through a bounce buffer. The default ignores it.
    fn use_guest_memory(&mut self, guest: &std::sync::Arc<crate::GuestMemory>) {
        let _ = guest;
    }
    /// Thin provisioning: `(allocated, capacity)` in bytes when blocks are allocated on
    /// first write (a thin logical volume): Identify Namespace then sets NSFEAT bit 0 and
    /// reports NUSE and NCAP from them. `None` (the default): fully provisioned.
    fn thin_usage(&self) -> Option<(u64, u64)> {
        None
    }
    /// A thin backend whose pool is over its warning threshold: the pool's free space in
    /// percent (the controller reports it as Available Spare below threshold, with an
    /// Asynchronous Event). Called after completions: must be cheap (no lock).
    fn capacity_warning(&self) -> Option<u8> {
        None
    }
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
    /// Move every finished request onto the end of `out`.
    pub(crate) fn append_to(&mut self, out: &mut Vec<(u64, Status)>) -> usize {
        let n = self.done.len();
        out.append(&mut self.done);
        n
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

    /// Submit one request of `op` at `offset` over `buf` (none: no buffers) and poll `b`
    /// until it completes (10 s at most); its status.
    pub(crate) fn run(
        b: &mut dyn Backend,
        op: IoOp,
        offset: u64,
        buf: Option<&mut [u8]>,
    ) -> Status {
        let iov = buf.map(|buf| libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        });
        let iovs = iov.as_slice();
        let req = IoRequest {
            tag: 0x77,
            op,
            offset,
            // SAFETY: `buf` is borrowed until this function returns, after the request was
            // polled to completion, and is not touched meanwhile.
            iov: unsafe { GuestBuffers::from_raw_iovecs(iovs) },
        };
        if let Err(s) = b.submit(&req) {
            return s;
        }
        let mut got = None;
        let t = std::time::Instant::now();
        while got.is_none() {
            assert!(t.elapsed().as_secs() < 10, "{op:?} never completed");
            b.poll(&mut |tag, s| {
                assert_eq!(tag, 0x77);
                got = Some(s);
            });
        }
        got.unwrap_or(Status::INTERNAL_ERROR)
    }

    /// Read `buf.len()` bytes at `offset` through `b`.
    pub(crate) fn read(b: &mut dyn Backend, offset: u64, buf: &mut [u8]) -> Status {
        run(b, IoOp::Read, offset, Some(buf))
    }

    /// Write `data` at `offset` through `b`.
    pub(crate) fn write(b: &mut dyn Backend, offset: u64, data: &[u8]) -> Status {
        let mut copy = data.to_vec();
        run(b, IoOp::Write { fua: false }, offset, Some(&mut copy))
    }

    /// Write a pattern through `b`, read it back, check zeroes/deallocate; shared by backends.
    /// Write, read back, flush, zero: tags use all 64 bits (a shared backend folds its user
    /// index into the top byte), so a backend that packs tags into fewer bits fails here.
    pub(crate) fn exercise(b: &mut dyn Backend) {
        exercise_with_tags(b, 0xfe << 56 | 0x00ff_ffff_ffff_fff0);
    }

    /// [`exercise`] with tags `hi | 1..=5`.
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
        // Write Zeroes and Deallocate through submit/poll, with the full 64-bit tag
        for (tag, op, offset) in [
            (HI | 4, IoOp::WriteZeroes { len: 512 }, 4096),
            (HI | 5, IoOp::Deallocate { len: 4096 }, 8192),
        ] {
            b.submit(&IoRequest {
                tag,
                op,
                offset,
                iov: GuestBuffers::EMPTY,
            })
            .unwrap();
            got.clear();
            while got.is_empty() {
                b.poll(&mut |t, s| got.push((t, s)));
            }
            assert_eq!(got, vec![(tag, Status::SUCCESS)], "{op:?}");
        }
        let mut z = vec![1u8; 8192];
        assert_eq!(read(b, 4096, &mut z), Status::SUCCESS);
        assert_eq!(&z[..512], &[0u8; 512][..], "write zeroes");
        assert_eq!(&z[512..4096], &data[512..4096]);
        assert!(z[4096..].iter().all(|&x| x == 0), "deallocate");
        assert_eq!(b.in_flight(), 0);
        let size = b.size();
        assert_ne!(read(b, size - 512, &mut [0u8; 1024]), Status::SUCCESS);
    }
}
