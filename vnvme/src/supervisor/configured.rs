//! `subsystem_delete` of a configured subsystem under a supervisor: the supervisor lets go of
//! what it held for it (its controllers' sockets, with their relays and memfds, and its
//! NVMe/TCP listener unless another subsystem listens there too) and starts every next
//! worker with the entry left empty (`--deleted-entry N`), so it does not come back from the
//! configuration while the supervisor runs, and the entries after it keep their numbers.

use std::path::PathBuf;

use crate::config::Config;

use super::Supervisor;

/// What the supervisor holds for one configured subsystem.
#[derive(Debug)]
pub(super) struct ConfiguredEntry {
    pub(super) nqn: String,
    /// Its controllers' vfio-user sockets (the PF's, then each VF's).
    sockets: Vec<PathBuf>,
    listen: Option<String>,
    /// The kept RAM its namespaces name (`malloc:SIZE@cN`).
    ram: Vec<String>,
    pub(super) deleted: bool,
}

/// The configured subsystems, by entry number.
pub(super) fn entries(cfg: &Config) -> Vec<ConfiguredEntry> {
    cfg.controllers
        .iter()
        .enumerate()
        .map(|(i, c)| ConfiguredEntry {
            nqn: crate::daemon::topology::entry_nqn(i, c),
            sockets: c
                .socket
                .iter()
                .flat_map(|s| {
                    std::iter::once(s.clone()).chain(
                        (1..=usize::from(c.vfs.unwrap_or(0)))
                            .map(|n| sriov::topology::vf_socket(s, n)),
                    )
                })
                .collect(),
            listen: c.tcp_listen.clone(),
            ram: c
                .namespaces
                .iter()
                .filter_map(|n| match n.backend.parse() {
                    Ok(crate::backend_spec::BackendSpec::Malloc { kept, .. }) => kept,
                    _ => None,
                })
                .chain(c.namespace_pool.as_deref().and_then(|p| match p.parse() {
                    Ok(crate::pool_spec::PoolSpec::Malloc { kept, .. }) => kept,
                    _ => None,
                }))
                .collect(),
            deleted: false,
        })
        .collect()
}

impl Supervisor {
    /// The worker deleted configured subsystem `nqn`: let go of what was held for it, and
    /// have every next worker leave its entry empty.
    pub(super) fn delete_configured(&mut self, nqn: &str) -> Result<(), String> {
        let Some(i) = self
            .configured
            .iter()
            .position(|e| e.nqn == nqn && !e.deleted)
        else {
            return Err(format!("{nqn} is no configured subsystem"));
        };
        self.configured[i].deleted = true;
        for s in self.configured[i].sockets.clone() {
            self.detach(&s);
        }
        if let Some(a) = self.configured[i].listen.clone() {
            let shared = self
                .configured
                .iter()
                .any(|e| !e.deleted && e.listen.as_deref() == Some(a.as_str()));
            if !shared {
                self.unlisten(&a);
            }
        }
        for k in self.configured[i].ram.clone() {
            self.forget_ram(&k);
        }
        log::info!("supervisor: configured subsystem {nqn} (entry {i}) deleted");
        Ok(())
    }
}
