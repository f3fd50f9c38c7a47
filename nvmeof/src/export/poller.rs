//! The target as a reactor's poller ([`device_model::Poller`]): it runs on the reactor of
//! the controllers it exports, so a capsule reaches its controller and the completion
//! leaves in the same pass of that reactor's loop, with no thread handoff on the way.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::SyncSender;

use sys_util::poll::PollFd;

use super::ExportSpec;
use super::event_loop::Target;

/// The running target on its reactor, until asked to stop.
pub(super) struct TargetPoller {
    pub target: Option<Target>,
    pub stop: Arc<AtomicBool>,
    /// Where the exported controllers go back when the target stops.
    pub done: SyncSender<Vec<ExportSpec>>,
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
        t.poll_input()
    }

    fn poll_output(&mut self) -> usize {
        self.target.as_mut().map_or(0, Target::poll_output)
    }

    fn wait_fds(&self, fds: &mut Vec<PollFd>) {
        if let Some(t) = &self.target {
            t.wait_fds(fds);
        }
    }

    fn expecting(&self) -> bool {
        self.target.as_ref().is_some_and(Target::controller_busy)
    }

    fn finished(&self) -> bool {
        self.target.is_none()
    }
}
