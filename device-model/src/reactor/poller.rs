//! Work a reactor runs beside its controllers on the same thread, and the controllers it
//! lends that work while it runs.
//!
//! A transport that feeds controllers commands (the NVMe/TCP target) runs as a [`Poller`] on
//! the reactor of the controllers it serves: a command read from a socket is in the
//! controller's ring before the controller is polled, and its completion is on the socket
//! right after, in one pass of the loop, with no wake-up or handoff between threads. While a
//! poller runs, [`super::ControllerHandle`] calls for controllers of the same reactor run
//! inline instead of by message (which would wait for the calling thread itself).

use std::cell::{Cell, RefCell};

use sys_util::poll::PollFd;

use super::Entry;

/// Work run on a reactor thread beside its controllers.
pub trait Poller: Send {
    /// Bring work in (read sockets, place commands in the controllers' rings); runs before
    /// the controllers are polled. Returns how much was done (0 = nothing).
    fn poll_input(&mut self) -> usize;
    /// Send results out (completions the controllers posted); runs after they were polled.
    fn poll_output(&mut self) -> usize;
    /// Add the descriptors whose readiness means new work: the idle reactor sleeps on them.
    fn wait_fds(&self, fds: &mut Vec<PollFd>);
    /// True while it waits on what no descriptor announces (commands on controllers of other
    /// reactors): the idle reactor then naps briefly instead of sleeping.
    fn expecting(&self) -> bool {
        false
    }
    /// True once it is done: the reactor drops it.
    fn finished(&self) -> bool;
}

thread_local! {
    /// The id of the reactor this thread runs (0: none).
    static HOME: Cell<u64> = const { Cell::new(0) };
    /// That reactor's controllers while its pollers run (empty otherwise).
    static LENT: RefCell<Vec<Entry>> = const { RefCell::new(Vec::new()) };
}

/// Mark this thread as reactor `id`'s.
pub(super) fn set_home(id: u64) {
    HOME.with(|h| h.set(id));
}

/// True on reactor `id`'s own thread.
pub(super) fn at_home(id: u64) -> bool {
    HOME.with(Cell::get) == id
}

/// Run `f` with `ctrls` lent to inline handle calls, and take them back.
pub(super) fn with_lent<T>(ctrls: &mut Vec<Entry>, f: impl FnOnce() -> T) -> T {
    LENT.with(|l| std::mem::swap(&mut *l.borrow_mut(), ctrls));
    let out = f();
    LENT.with(|l| std::mem::swap(&mut *l.borrow_mut(), ctrls));
    out
}

/// Run `f` on lent controller `id` when this thread is its reactor's and lends it now;
/// `None` otherwise (the caller then sends a message).
pub(super) fn on_lent<T>(reactor: u64, id: u64, f: impl FnOnce(&mut Entry) -> T) -> Option<T> {
    if !at_home(reactor) {
        return None;
    }
    LENT.with(|l| {
        let mut ctrls = l.try_borrow_mut().ok()?;
        let e = ctrls.iter_mut().find(|e| e.id == id)?;
        Some(f(e))
    })
}
