//! The target as a reactor's poller ([`device_model::Poller`]): it runs on the reactor of
//! the controllers it exports, so a capsule reaches its controller and the completion
//! leaves in the same pass of that reactor's loop, with no thread handoff on the way.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::SyncSender;
use std::time::{Duration, Instant};

use sys_util::poll::PollFd;

use super::ExportSpec;
use super::event_loop::Target;

/// The running target on its reactor, until asked to stop.
pub(super) struct TargetPoller {
    pub target: Option<Target>,
    pub stop: Arc<AtomicBool>,
    /// Where the exported controllers go back when the target stops.
    pub done: SyncSender<Vec<ExportSpec>>,
    /// Milliseconds a hang-up on every host ([`Target::hang_up`]) may take; 0 until one is
    /// asked for.
    pub hang_up_ms: Arc<AtomicU64>,
    /// The end of the hang-up, once it started.
    pub hanging_until: Option<Instant>,
    /// Told once every host has closed (`true`), or the time is up.
    pub hung_up: SyncSender<bool>,
}

impl device_model::Poller for TargetPoller {
    fn poll_input(&mut self) -> usize {
        let Some(t) = self.target.as_mut() else {
            return 0;
        };
        if self.stop.load(Ordering::Acquire) {
            t.close_all();
            if let Some(t) = self.target.take() {
                let _ = self.done.try_send(t.into_specs());
            }
            return 1;
        }
        let until = match self.hanging_until {
            Some(until) => until,
            None => match self.hang_up_ms.load(Ordering::Acquire) {
                0 => return t.poll_input(),
                ms => Instant::now() + Duration::from_millis(ms),
            },
        };
        let all_closed = t.hang_up();
        if Instant::now() < until && !all_closed {
            self.hanging_until = Some(until);
            // nothing to do until a host sends or closes: the reactor may nap in poll(2) on
            // the connections (`wait_fds`) rather than spin on a core the hosts may need
            return 0;
        }
        // every host closed, or the time is up (the process exits: what is left closes)
        self.hanging_until = Some(Instant::now());
        let _ = self.hung_up.try_send(all_closed);
        0
    }

    fn poll_output(&mut self) -> usize {
        if self.hanging_until.is_some() {
            return 0;
        }
        self.target.as_mut().map_or(0, Target::poll_output)
    }

    fn wait_fds(&self, fds: &mut Vec<PollFd>) {
        if let Some(t) = &self.target {
            let listeners = fds.len()..fds.len() + t.listeners.len();
            t.wait_fds(fds);
            if self.hanging_until.is_some() {
                // who waits in the backlog is the next process's
                fds.drain(listeners);
            }
        }
    }

    fn expecting(&self) -> bool {
        self.target.as_ref().is_some_and(Target::controller_busy)
    }

    fn finished(&self) -> bool {
        self.target.is_none()
    }
}
