//! Shutdown notification (NVMe base 2.0 §3.6) and the daemon's own flush: wait for requests
//! in flight, then flush every namespace, polled and never waited for on a reactor.

use nvme_spec::Status;

use crate::backend::IoRequest;
use crate::registers::ShutdownStatus;

use super::{Controller, OWN_FLUSH_QID};

impl Controller {
    /// Make every namespace's data durable and wait for it, up to
    /// [`crate::quiesce::SHUTDOWN_WAIT`] (daemon stop). This blocks the calling thread: call it
    /// on a controller taken off its reactor, which is going away.
    pub fn flush(&mut self) -> Result<(), Status> {
        let until = std::time::Instant::now() + crate::quiesce::SHUTDOWN_WAIT;
        self.start_own_flush(until, false);
        let mem = self.mem.snapshot();
        loop {
            self.reap(&mem);
            let Some(f) = self.quiesce.flushing.filter(|f| !f.shutdown) else {
                return Err(Status::INTERNAL_ERROR); // replaced: cannot happen off a reactor
            };
            if f.left == 0 {
                self.quiesce.flushing = None;
                return if f.status.is_success() {
                    Ok(())
                } else {
                    Err(f.status)
                };
            }
            if std::time::Instant::now() > f.until {
                self.quiesce.flushing = None;
                return Err(Status::INTERNAL_ERROR);
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
    }

    /// Send a Flush to every namespace's backend, tagged as the controller's own; their
    /// completions are counted in `quiesce.flushing` ([`Controller::reap`]).
    pub(super) fn start_own_flush(&mut self, until: std::time::Instant, shutdown: bool) {
        let seq = self.quiesce.next_flush_seq();
        let tag = crate::quiesce::tag(self.quiesce.epoch(), OWN_FLUSH_QID, seq);
        let mut f = crate::quiesce::OwnFlush {
            seq,
            left: 0,
            status: Status::SUCCESS,
            until,
            shutdown,
        };
        for ns in &mut self.namespaces {
            match ns.backend.submit(&IoRequest::flush(tag)) {
                Ok(()) => f.left += 1,
                Err(s) if f.status.is_success() => f.status = s,
                Err(_) => {}
            }
        }
        self.quiesce.flushing = Some(f);
    }

    /// Backend requests of the current epoch in flight (retired ones not counted).
    pub(super) fn requests_in_flight(&self) -> usize {
        let all: usize = self.namespaces.iter().map(|n| n.backend.in_flight()).sum();
        let detaching: usize = self
            .detaching
            .iter()
            .map(|d| d.ns.backend.in_flight())
            .sum();
        (all + detaching).saturating_sub(self.quiesce.retired_requests())
    }

    /// A shutdown notification (§3.6) completes once requests in flight have finished (or
    /// after [`crate::quiesce::SHUTDOWN_WAIT`]) and then every namespace's Flush has (or the
    /// same wait passed): SHST complete. Polled, never waited for.
    #[inline]
    pub(super) fn poll_shutdown(&mut self) {
        if self.quiesce.shutting_down.is_some() || self.quiesce.flushing.is_some() {
            self.poll_shutdown_steps(); // else nothing to do, and no clock read
        }
    }

    #[cold]
    fn poll_shutdown_steps(&mut self) {
        let now = std::time::Instant::now();
        if let Some(until) = self.quiesce.shutting_down {
            if self.requests_in_flight() > 0 && now < until {
                return;
            }
            self.quiesce.shutting_down = None;
            self.start_own_flush(now + crate::quiesce::SHUTDOWN_WAIT, true);
        }
        let Some(f) = self.quiesce.flushing.filter(|f| f.shutdown) else {
            return;
        };
        if f.left > 0 && now < f.until {
            return;
        }
        if f.left > 0 {
            crate::warn_limited!(
                "{}: {} namespace flushes unanswered at shutdown",
                self.cfg.serial,
                f.left
            );
        } else if !f.status.is_success() {
            crate::warn_limited!(
                "{}: flush on shutdown failed: {}",
                self.cfg.serial,
                f.status
            );
        }
        self.quiesce.flushing = None;
        self.regs.csts.set_shutdown(ShutdownStatus::Complete);
    }
}
