//! Stopping entries: servers and NVMe/TCP targets end, controllers are flushed.

use std::sync::atomic::Ordering;

use super::{Daemon, DaemonError};

impl Daemon {
    /// Stop serving, drain and flush every namespace, remove the sockets.
    pub fn stop(mut self) -> Result<(), DaemonError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), DaemonError> {
        for (index, e) in self.running() {
            for (nsid, t) in &e.transfers {
                log::info!(
                    "controller[{index}] namespace {nsid}: {} bytes zero-copy, {} bytes bounced",
                    t.zero_copy_bytes.load(Ordering::Relaxed),
                    t.bounced_bytes.load(Ordering::Relaxed)
                );
            }
        }
        self.stop_entries(&|_| true)
    }

    /// Stop the servers and targets of the entries `which` selects; flush their controllers.
    pub(super) fn stop_entries(
        &mut self,
        which: &dyn Fn(usize) -> bool,
    ) -> Result<(), DaemonError> {
        for (i, e) in self.running() {
            if which(i) {
                e.stop();
            }
        }
        let (mine, others): (Vec<_>, Vec<_>) = std::mem::take(&mut self.targets)
            .into_iter()
            .partition(|(entries, _)| entries.iter().any(|&e| which(e)));
        self.targets = others;
        for (_, t) in mine {
            for export in t.stop() {
                if let Some(mut ctrl) = export.handle.stop()
                    && let Err(s) = ctrl.flush()
                {
                    log::error!("{}: flush failed: {s}", export.nqn);
                }
            }
        }
        let mut first_err = None;
        for (i, e) in self.entries.iter_mut().enumerate() {
            if let Some(e) = e.as_mut().filter(|_| which(i))
                && let Err(err) = e.join_servers(i)
            {
                first_err.get_or_insert(err);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let serving = self.running().any(|(_, e)| !e.servers.is_empty());
        if serving || !self.targets.is_empty() {
            let _ = self.shutdown();
        }
    }
}
