//! One namespace backend used by several controllers of a subsystem (a namespace attached
//! to more than one controller, e.g. a VM's vfio-user controller and an NVMe/TCP export of
//! the same disk, or a PF and its VFs). Each controller gets a [`SharedBackend`] handle from
//! the namespace's [`SharedSource`] (at start, or when the namespace is attached at run
//! time); requests go to the one backend under a mutex, and completions are routed back to
//! the handle that submitted them by a user index folded into the tag's top byte.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nvme_spec::Status;

use super::{Backend, IoRequest, Submitted};

const USER_SHIFT: u32 = 56;
const TAG_MASK: u64 = (1 << USER_SHIFT) - 1;
/// Handles one backend can have at once (the user index is one byte of the tag).
pub const MAX_USERS: usize = 255;

struct Inner {
    backend: Box<dyn Backend>,
    /// Completions per user, waiting for that user's poll.
    done: Vec<Vec<(u64, Status)>>,
    /// User indexes handed out (a dropped handle's index stays taken until its requests
    /// are done, so a new handle never gets an old one's completions).
    taken: Vec<bool>,
    /// Requests in flight per user.
    pending: Vec<usize>,
    /// The user's handle is gone: its completions are dropped.
    orphaned: Vec<bool>,
}

/// The shared backend a namespace's handles come from.
#[derive(Clone)]
pub struct SharedSource {
    inner: Arc<Mutex<Inner>>,
    size: u64,
    /// The backend's size cell, if its size changes at run time.
    live: Option<Arc<AtomicU64>>,
    describe: String,
    max_transfer: Option<u64>,
}

impl std::fmt::Debug for SharedSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedSource")
            .field("describe", &self.describe)
            .finish_non_exhaustive()
    }
}

impl SharedSource {
    /// Share `backend`.
    pub fn new(backend: Box<dyn Backend>) -> Self {
        let size = backend.size();
        let live = backend.live_size();
        let describe = format!("{} (shared)", backend.describe());
        let max_transfer = backend.max_transfer();
        Self {
            inner: Arc::new(Mutex::new(Inner {
                backend,
                done: Vec::new(),
                taken: Vec::new(),
                pending: Vec::new(),
                orphaned: Vec::new(),
            })),
            size,
            live,
            describe,
            max_transfer,
        }
    }

    /// Size in bytes (current, for a backend whose size changes).
    pub fn size(&self) -> u64 {
        self.live
            .as_ref()
            .map_or(self.size, |l| l.load(Ordering::Relaxed))
    }

    /// A new handle; `None` when [`MAX_USERS`] are out.
    pub fn handle(&self) -> Option<SharedBackend> {
        let mut g = lock(&self.inner);
        let user = match g.taken.iter().position(|t| !t) {
            Some(u) => u,
            None if g.taken.len() < MAX_USERS => {
                g.taken.push(false);
                g.done.push(Vec::new());
                g.pending.push(0);
                g.orphaned.push(false);
                g.taken.len() - 1
            }
            None => return None,
        };
        g.taken[user] = true;
        g.orphaned[user] = false;
        g.done[user].clear();
        Some(SharedBackend {
            inner: Arc::clone(&self.inner),
            user,
            in_flight: 0,
            mine: Vec::new(),
            size: self.size,
            live: self.live.clone(),
            describe: self.describe.clone(),
            max_transfer: self.max_transfer,
        })
    }
}

fn lock(inner: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    // a panic while holding the lock leaves the backend as it was: keep using it
    inner
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A controller's handle on a shared backend.
pub struct SharedBackend {
    inner: Arc<Mutex<Inner>>,
    user: usize,
    in_flight: usize,
    /// This handle's completions taken out of the shared state, swapped with its list
    /// there at each poll so that neither is ever reallocated once warm.
    mine: Vec<(u64, Status)>,
    size: u64,
    /// The backend's size cell, if its size changes at run time.
    live: Option<Arc<AtomicU64>>,
    describe: String,
    max_transfer: Option<u64>,
}

impl std::fmt::Debug for SharedBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedBackend")
            .field("user", &self.user)
            .field("describe", &self.describe)
            .finish_non_exhaustive()
    }
}

impl SharedBackend {
    /// `users` handles on `backend` (at most [`MAX_USERS`]).
    pub fn split(backend: Box<dyn Backend>, users: usize) -> Vec<SharedBackend> {
        assert!((1..=MAX_USERS).contains(&users), "1..=255 users");
        let src = SharedSource::new(backend);
        (0..users)
            .map(|_| src.handle().expect("within MAX_USERS"))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    /// `req` with this handle's user in its tag (its completion comes back to this handle).
    fn tagged<'a>(&self, req: &IoRequest<'a>) -> IoRequest<'a> {
        debug_assert_eq!(req.tag & !TAG_MASK, 0, "tag uses the user byte");
        IoRequest {
            tag: req.tag | ((self.user as u64) << USER_SHIFT),
            op: req.op,
            offset: req.offset,
            iov: req.iov,
        }
    }
}

impl Drop for SharedBackend {
    fn drop(&mut self) {
        // completions still owed to this handle are dropped; its index is free again once
        // none is in flight
        let mut g = self.lock();
        let u = self.user;
        g.done[u].clear();
        if g.pending[u] == 0 {
            g.taken[u] = false;
        } else {
            g.orphaned[u] = true;
        }
    }
}

impl Backend for SharedBackend {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn size(&self) -> u64 {
        self.live
            .as_ref()
            .map_or(self.size, |l| l.load(Ordering::Relaxed))
    }

    fn live_size(&self) -> Option<Arc<AtomicU64>> {
        self.live.clone()
    }

    fn submit(&mut self, req: &IoRequest<'_>) -> Result<(), Status> {
        let tagged = self.tagged(req);
        let mut g = self.lock();
        g.backend.submit(&tagged)?;
        g.pending[self.user] += 1;
        drop(g);
        self.in_flight += 1;
        Ok(())
    }

    fn execute(&mut self, req: &IoRequest<'_>) -> Result<Submitted, Status> {
        let tagged = self.tagged(req);
        let mut g = self.lock();
        if g.backend.execute(&tagged)? == Submitted::Completed {
            return Ok(Submitted::Completed);
        }
        g.pending[self.user] += 1;
        drop(g);
        self.in_flight += 1;
        Ok(Submitted::Queued)
    }

    fn poll(&mut self, done: &mut dyn FnMut(u64, Status)) -> usize {
        let mut mine = std::mem::take(&mut self.mine);
        mine.clear();
        let mut g = lock(&self.inner);
        let Inner {
            backend,
            done: all,
            taken,
            pending,
            orphaned,
        } = &mut *g;
        if backend.in_flight() > 0 {
            backend.poll(&mut |t, s| {
                let u = (t >> USER_SHIFT) as usize;
                if u >= all.len() {
                    return;
                }
                pending[u] = pending[u].saturating_sub(1);
                if orphaned[u] {
                    if pending[u] == 0 {
                        orphaned[u] = false;
                        taken[u] = false;
                    }
                    return;
                }
                all[u].push((t & TAG_MASK, s));
            });
        }
        std::mem::swap(&mut all[self.user], &mut mine);
        // a backend that changes size (a resized volume) is seen at the next poll
        self.size = backend.size();
        drop(g);
        for &(t, s) in &mine {
            done(t, s);
        }
        let n = mine.len();
        self.in_flight = self.in_flight.saturating_sub(n);
        self.mine = mine;
        n
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn max_transfer(&self) -> Option<u64> {
        self.max_transfer
    }

    fn thin_usage(&self) -> Option<(u64, u64)> {
        lock(&self.inner).backend.thin_usage()
    }

    fn capacity_warning(&self) -> Option<u8> {
        lock(&self.inner).backend.capacity_warning()
    }
}

#[cfg(test)]
#[allow(unsafe_code)] // test requests over local buffers
mod tests {
    use super::super::{IoOp, MallocBackend};
    use super::*;

    #[test]
    fn an_index_with_requests_in_flight_is_not_handed_out_again() {
        let m = MallocBackend::new(1 << 20).unwrap();
        let src = SharedSource::new(Box::new(m));
        let mut a = src.handle().unwrap();
        let mut data = vec![1u8; 4096];
        let iov = [libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: 4096,
        }];
        a.submit(&IoRequest {
            tag: 9,
            op: IoOp::Read,
            offset: 0,
            // SAFETY: `data` outlives the request and is not touched while it runs.
            iov: unsafe { crate::dptr::GuestBuffers::from_raw_iovecs(&iov) },
        })
        .unwrap();
        drop(a); // gone with a request in flight
        let mut b = src.handle().unwrap();
        assert_eq!(b.user, 1, "user 0 is still draining");
        // b never sees a's completion; once it is drained, index 0 is free again
        let mut got = Vec::new();
        for _ in 0..100 {
            b.poll(&mut |t, s| got.push((t, s)));
        }
        assert!(got.is_empty(), "{got:?}");
        assert_eq!(src.handle().unwrap().user, 0);
    }

    /// A handle on an instant backend answers `execute` at once: the data is there, no poll
    /// reports the request again, and nothing is left pending on the handle's index.
    #[test]
    fn execute_on_an_instant_backend_completes_at_once() {
        let m = MallocBackend::new(1 << 20).unwrap();
        let src = SharedSource::new(Box::new(m));
        let mut a = src.handle().unwrap();
        let mut data = vec![5u8; 4096];
        let iov = [libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: 4096,
        }];
        let req = |op| IoRequest {
            tag: 3,
            op,
            offset: 8192,
            // SAFETY: `data` outlives the requests and is not touched while they run.
            iov: unsafe { crate::dptr::GuestBuffers::from_raw_iovecs(&iov) },
        };
        let write = req(IoOp::Write { fua: false });
        assert_eq!(a.execute(&write), Ok(Submitted::Completed));
        assert_eq!(a.in_flight(), 0);
        let mut got = Vec::new();
        a.poll(&mut |t, s| got.push((t, s)));
        assert!(got.is_empty(), "{got:?}");
        let mut back = [0u8; 4096];
        assert_eq!(
            super::super::tests::read(&mut a, 8192, &mut back),
            Status::SUCCESS
        );
        assert_eq!(back, [5u8; 4096]);
        let past = IoRequest {
            offset: 1 << 20,
            ..req(IoOp::Read)
        };
        assert!(a.execute(&past).is_err(), "past the end");
        drop(a);
        assert_eq!(src.handle().unwrap().user, 0, "nothing left pending");
    }

    /// The completion lists keep their capacity from poll to poll (no allocation per I/O
    /// once warm): the handle's and the shared one are swapped, never taken and dropped.
    #[test]
    fn polling_reuses_the_completion_lists() {
        let m = MallocBackend::new(1 << 20).unwrap();
        let mut h = SharedBackend::split(Box::new(m), 1).remove(0);
        let mut data = vec![0u8; 4096];
        let iov = [libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: 4096,
        }];
        for round in 0..3u64 {
            for k in 0..4 {
                h.submit(&IoRequest {
                    tag: round * 4 + k,
                    op: IoOp::Read,
                    offset: 0,
                    // SAFETY: `data` outlives the requests (polled to completion below) and
                    // is not touched meanwhile.
                    iov: unsafe { crate::dptr::GuestBuffers::from_raw_iovecs(&iov) },
                })
                .unwrap();
            }
            let mut n = 0;
            while n < 4 {
                n += h.poll(&mut |_, _| {});
            }
        }
        let shared = h.lock().done[h.user].capacity();
        assert!(
            h.mine.capacity() >= 4 && shared >= 4,
            "both lists stay allocated: {} and {shared}",
            h.mine.capacity()
        );
    }

    #[test]
    fn completions_go_back_to_the_handle_that_submitted() {
        let m = MallocBackend::new(1 << 20).unwrap();
        let mut h = SharedBackend::split(Box::new(m), 2);
        super::super::tests::exercise_with_tags(&mut h[0], 0xff_fff0);
        let mut data = vec![7u8; 4096];
        let iov = [libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: 4096,
        }];
        h[0].submit(&IoRequest {
            tag: 5,
            op: IoOp::Write { fua: false },
            offset: 0,
            // SAFETY: `data` outlives the request and is not touched while it runs.
            iov: unsafe { crate::dptr::GuestBuffers::from_raw_iovecs(&iov) },
        })
        .unwrap();
        // the other handle polls first: it must not see user 0's completion
        let mut got1 = Vec::new();
        h[1].poll(&mut |t, s| got1.push((t, s)));
        assert!(got1.is_empty());
        let mut got0 = Vec::new();
        while got0.is_empty() {
            h[0].poll(&mut |t, s| got0.push((t, s)));
        }
        assert_eq!(got0, vec![(5, Status::SUCCESS)]);
        // and user 1 reads what user 0 wrote
        let mut back = vec![0u8; 4096];
        assert_eq!(
            super::super::tests::read(&mut h[1], 0, &mut back),
            Status::SUCCESS
        );
        assert_eq!(back, data);
    }

    #[test]
    fn a_shared_file_serves_every_handle() {
        // the file backend once packed tags into 40 bits: every handle but the first failed
        let dir = std::env::temp_dir().join(format!("vnvme-shared-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f =
            crate::backend::file::FileBackend::open(&dir.join("ns.img"), Some(1 << 20)).unwrap();
        let mut h = SharedBackend::split(Box::new(f), 3);
        for handle in h.iter_mut().rev() {
            super::super::tests::exercise_with_tags(handle, 0x00ff_ffff_ffff_fff0);
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}
