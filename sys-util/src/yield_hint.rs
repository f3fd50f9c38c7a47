//! A hint from a backend to the polling thread it runs on: work this thread waits for runs
//! in a kernel worker (io_uring hands `fsync`, `fallocate` and synchronous writes to its
//! io-wq threads, which inherit the submitter's CPU affinity). A reactor that busy-polls a
//! pinned core would hold that core for its whole time slice while the worker it waits for
//! cannot run; on the hint it yields once instead (a bare system call when nothing else
//! wants the core).

use std::cell::Cell;

thread_local! {
    static WANTED: Cell<bool> = const { Cell::new(false) };
}

/// Ask this thread's poll loop to yield at its next idle pass.
pub fn request() {
    WANTED.with(|w| w.set(true));
}

/// Whether a yield was asked for since the last call (and forget the request).
pub fn take() -> bool {
    WANTED.with(|w| w.replace(false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_taken_once_and_stays_on_its_thread() {
        assert!(!take());
        request();
        assert!(!std::thread::spawn(take).join().unwrap());
        assert!(take());
        assert!(!take());
    }
}
