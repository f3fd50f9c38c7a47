//! An array with a thread of its own for background work. A controller polls its backend
//! only while the guest has requests in flight (and only while a host has it enabled), so a
//! rebuild, a resync after a crash, a superblock update or a management command would wait
//! for guest I/O. [`DrivenArray`] shares the array with a small thread that steps it
//! whenever no reactor has polled it for a while (2 ms): background work goes on with no
//! guest attached, and a controller reset never waits for a rebuild.
//!
//! The array is a baton: the reactor takes it out of the shared slot when guest I/O starts
//! and keeps it, with no lock per request, until none is in flight; then it parks it back in
//! the slot, where the thread may step it. At a steady queue depth the reactor never touches
//! the lock; at depth one it takes it twice per request, as a mutex per call would.

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
    /// The array while the reactor does not hold it.
    parked: Mutex<Option<Box<Array>>>,
    /// Reactor polls so far (the thread stays away while it moves).
    polls: AtomicU64,
    stop: AtomicBool,
}

/// An array and its background thread; a [`Backend`].
pub struct DrivenArray {
    shared: Arc<Shared>,
    /// The array while guest requests are in flight (taken from `shared.parked`).
    held: Option<Box<Array>>,
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

fn lock(m: &Mutex<Option<Box<Array>>>) -> MutexGuard<'_, Option<Box<Array>>> {
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
            parked: Mutex::new(Some(Box::new(array))),
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
                    if let Some(a) = lock(&s.parked).as_mut() {
                        a.step();
                        busy = a.busy();
                    }
                }
            })
            .ok();
        Self {
            shared,
            held: None,
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
        self.park();
        let mut a = lock(&self.shared.parked)
            .take()
            .expect("parked: the handle holds none and the thread is joined");
        a.driven = false;
        *a
    }

    /// The array, taken from the slot unless already held.
    fn hold(&mut self) -> &mut Array {
        if self.held.is_none() {
            self.held = lock(&self.shared.parked).take();
        }
        self.held
            .as_deref_mut()
            .expect("the array is held or parked, never lost")
    }

    /// Put the array back in the slot (no guest request in flight).
    fn park(&mut self) {
        if let Some(a) = self.held.take() {
            *lock(&self.shared.parked) = Some(a);
        }
    }

    fn stop_thread(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Run `f` on the array (tests, status).
    pub fn with<T>(&mut self, f: impl FnOnce(&mut Array) -> T) -> T {
        let r = f(self.hold());
        if self.in_flight == 0 {
            self.park();
        }
        r
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
        let a = self.hold();
        let r = a.submit(req);
        self.in_flight = a.in_flight();
        if self.in_flight == 0 {
            self.park(); // refused, nothing in flight
        }
        r
    }
    fn poll(&mut self, done: &mut dyn FnMut(u64, Status)) -> usize {
        self.polls = self.polls.wrapping_add(1);
        self.shared.polls.store(self.polls, Ordering::Relaxed);
        let a = self.hold();
        let n = a.poll(done);
        self.in_flight = a.in_flight();
        if self.in_flight == 0 {
            self.park();
        }
        n
    }
    fn in_flight(&self) -> usize {
        self.in_flight
    }
    fn use_guest_memory(&mut self, guest: &Arc<device_model::GuestMemory>) {
        self.hold().use_guest_memory(guest);
        if self.in_flight == 0 {
            self.park();
        }
    }
    fn guest_memory_changed(&mut self) {
        self.hold().guest_memory_changed();
        if self.in_flight == 0 {
            self.park();
        }
    }
}
