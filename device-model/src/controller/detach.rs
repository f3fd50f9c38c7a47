//! Namespaces detached or replaced while requests were in flight: gone for the host at
//! once, their backends polled until those requests finish.

use std::sync::Arc;

use super::Controller;

/// How long a detached namespace's requests in flight may take before that is logged as an
/// error.
pub const DETACH_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// A namespace detached with requests in flight.
pub(super) struct Detaching {
    pub(super) ns: crate::namespace::Namespace,
    pub(super) until: std::time::Instant,
    pub(super) warned: bool,
}

impl Controller {
    /// Take namespace `i` out of the host's view (it is being detached or replaced): new
    /// commands no longer reach it. Its requests in flight complete as usual: its backend is
    /// polled until they have, and dropped then ([`Controller::reap`]); nothing waits here.
    /// (It is never dropped sooner: its requests may point into memory their command slots
    /// keep mapped only while the requests are counted in flight, see [`crate::quiesce`].)
    pub(crate) fn detach_namespace(&mut self, i: usize) {
        let ns = self.namespaces.remove(i);
        self.namespaces_changed();
        if ns.backend.in_flight() > 0 {
            self.detaching.push(Detaching {
                ns,
                until: std::time::Instant::now() + DETACH_WAIT,
                warned: false,
            });
        }
    }

    /// List the attached namespaces' counters for readers again (attach, detach).
    pub(crate) fn namespaces_changed(&self) {
        self.stats.set_namespaces(
            self.namespaces
                .iter()
                .map(|n| (n.nsid, Arc::clone(&n.stats))),
        );
    }

    /// Drop detached namespaces with nothing in flight any more; say so once of those whose
    /// requests take longer than [`DETACH_WAIT`].
    pub(super) fn poll_detaching(&mut self) {
        let now = std::time::Instant::now();
        let serial = &self.cfg.serial;
        self.detaching.retain_mut(|d| {
            let left = d.ns.backend.in_flight();
            if left > 0 && now > d.until && !d.warned {
                d.warned = true;
                crate::error_limited!(
                    "{serial}: namespace {}: {left} requests still in flight {} s after it \
                     was detached; its backend is kept until they finish",
                    d.ns.nsid,
                    DETACH_WAIT.as_secs()
                );
            }
            left > 0
        });
    }
}
