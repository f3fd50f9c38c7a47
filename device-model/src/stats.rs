//! Controller events the control plane can read without a message to the reactor (daemon
//! status, tests). Updated only on rare events, never per I/O.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Counters of one controller since the daemon started.
#[derive(Debug, Default)]
pub struct ControllerStats {
    /// Controller enables (CC.EN 0 -> 1 that brought the controller ready).
    pub enables: AtomicU64,
    /// Successful Doorbell Buffer Config commands.
    pub shadow_doorbell_configs: AtomicU64,
    /// Asynchronous events raised.
    pub async_events: AtomicU64,
    /// Times the controller entered Controller Fatal Status.
    pub fatal: AtomicU64,
    /// CSTS.RDY as of the last enable or reset.
    pub ready: AtomicBool,
}

impl ControllerStats {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Read a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
