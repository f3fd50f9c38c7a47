//! Where controllers run: a thread each, or round robin on shared reactor threads.

use device_model::{Controller, ControllerHandle, PollMode, Reactor};

use crate::config::{Config, PollSetting};

/// The reactors of a daemon (the shared threads end after the controllers they run).
pub(super) struct Placement {
    mode: PollMode,
    shared: Vec<Reactor>,
    next: usize,
}

impl Placement {
    /// `cfg.reactors` shared threads, none meaning a thread per controller.
    pub(super) fn new(cfg: &Config) -> std::io::Result<Self> {
        let mode = if cfg.poll == PollSetting::Busy {
            PollMode::Busy
        } else {
            PollMode::Adaptive
        };
        let shared = (0..cfg.reactors)
            .map(|i| Reactor::spawn(&format!("reactor-s{i}"), mode))
            .collect::<std::io::Result<_>>()?;
        Ok(Self {
            mode,
            shared,
            next: 0,
        })
    }

    /// Start running `ctrl` (a thread named `name`, or the next shared reactor).
    pub(super) fn place(
        &mut self,
        name: &str,
        ctrl: Controller,
    ) -> std::io::Result<ControllerHandle> {
        if self.shared.is_empty() {
            return ControllerHandle::spawn(name, ctrl, self.mode);
        }
        let r = &self.shared[self.next % self.shared.len()];
        self.next += 1;
        Ok(r.add(ctrl))
    }
}
