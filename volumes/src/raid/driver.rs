//! An array with a thread of its own for background work. A controller polls its backend
//! only while the guest has requests in flight (and only while a host has it enabled), so a
//! rebuild, a resync after a crash, a superblock update or a management command would wait
//! for guest I/O. [`DrivenArray`] shares the array with a small thread that steps it
//! whenever no reactor has polled it for a while (2 ms): background work goes on with no
//! guest attached, and a controller reset never waits for a rebuild.
//!
//! The reactor and the thread take turns through a mutex: uncontended while the guest does
//! I/O (the thread stays away while polls come), as for a shared namespace's backend.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use device_model::backend::{Backend, IoRequest};
use nvme_spec::Status;

use super::array::Array;

/// How long the reactor may leave the array unpolled before the thread steps it.
const IDLE: Duration = Duration::from_millis(2);
/// The thread's pace while the array has work under way (a rebuild) and no reactor polls.
const BUSY: Duration = Duration::from_micros(50);

struct Shared {
    array: Mutex<Array>,
    /// Reactor polls so far (the thread stays away while it moves).
    polls: AtomicU64,
    stop: AtomicBool,
}

/// An array and its background thread; a [`Backend`].
pub struct DrivenArray {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    /// Polls so far (only this handle writes `shared.polls`: a store, not an atomic
    /// read-modify-write, per poll).
    polls: u64,
    /// The array's guest requests in flight as of the last submit or poll: only those two
    /// change it (the thread's steps leave completions for the next poll), so the
    /// controller's frequent question is answered without the lock.
    in_flight: usize,
    describe: String,
    size: u64,
}

fn lock(m: &Mutex<Array>) -> MutexGuard<'_, Array> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl DrivenArray {
    /// Give `array` its thread.
    pub fn new(mut array: Array) -> Self {
        array.driven = true;
        let describe = array.describe();
        let size = array.size();
        let name = array.name.clone();
        let shared = Arc::new(Shared {
            array: Mutex::new(array),
            polls: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(format!("raid-{name}"))
            .spawn(move || {
                let mut seen = u64::MAX;
                let mut busy = false;
                while !s.stop.load(Ordering::Acquire) {
                    std::thread::sleep(if busy { BUSY } else { IDLE });
                    let now = s.polls.load(Ordering::Relaxed);
                    if now != seen {
                        seen = now; // the reactor is polling it
                        busy = false;
                        continue;
                    }
                    let mut a = lock(&s.array);
                    a.step();
                    busy = a.busy();
                }
            })
            .ok();
        Self {
            shared,
            thread,
            polls: 0,
            in_flight: 0,
            describe,
            size,
        }
    }

    /// Stop the thread and take the array back.
    pub fn into_array(mut self) -> Array {
        self.stop_thread();
        let shared = Arc::clone(&self.shared);
        drop(self);
        let Ok(s) = Arc::try_unwrap(shared) else {
            unreachable!("the thread is joined and the handle dropped: no other owner")
        };
        let mut a = s.array.into_inner().unwrap_or_else(PoisonError::into_inner);
        a.driven = false;
        a
    }

    fn stop_thread(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Run `f` on the array (tests, status).
    pub fn with<T>(&self, f: impl FnOnce(&mut Array) -> T) -> T {
        f(&mut lock(&self.shared.array))
    }
}

impl Drop for DrivenArray {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

impl Backend for DrivenArray {
    fn describe(&self) -> String {
        self.describe.clone()
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn submit(&mut self, req: &IoRequest<'_>) -> Result<(), Status> {
        let mut a = lock(&self.shared.array);
        let r = a.submit(req);
        self.in_flight = a.in_flight();
        r
    }
    fn poll(&mut self, done: &mut dyn FnMut(u64, Status)) -> usize {
        self.polls = self.polls.wrapping_add(1);
        self.shared.polls.store(self.polls, Ordering::Relaxed);
        let mut a = lock(&self.shared.array);
        let n = a.poll(done);
        self.in_flight = a.in_flight();
        n
    }
    fn in_flight(&self) -> usize {
        self.in_flight
    }
    fn guest_memory_changed(&mut self) {
        lock(&self.shared.array).guest_memory_changed();
    }
}
