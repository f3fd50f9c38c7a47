//! The running daemon: for each configured `[[controller]]` entry its NVM subsystem, its
//! namespaces' backends, its controllers on reactor threads, and their vfio-user servers
//! and NVMe/TCP exports.
//!
//! - [`topology`]: CNTLIDs, NQNs and VF sockets of an entry's controllers;
//! - `build`: one controller from the configuration; `placement`: which reactor runs it;
//! - `entry`: one entry while it runs; `management`: run-time changes (namespaces, QoS,
//!   VFs, entries added and removed); `shutdown`: stopping entries.

mod build;
mod entry;
mod error;
mod management;
mod placement;
mod shutdown;
pub mod topology;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use device_model::{ControllerStats, QosControl, QosLimits};
use nvmeof::export::{ExportSpec, TcpTarget};
use pcie_p2p::{DeviceRegistry, TransferStats};
use sriov::{Subsystem, VirtGroup};

pub use error::{DaemonError, MgmtError};
pub use topology::vf_socket;

use entry::Entry;
use placement::Placement;

use crate::config::Config;

/// A running daemon.
pub struct Daemon {
    /// Every entry by configuration index; `None` once removed at run time (indexes are
    /// not reused: CNTLIDs derive from them).
    entries: Vec<Option<Entry>>,
    /// NVMe/TCP targets (one per listen address) and the entries they export.
    targets: Vec<(Vec<usize>, TcpTarget)>,
    /// Where new controllers run (it holds the shared reactor threads, which end after the
    /// controllers).
    place: Placement,
    /// `nvme:` devices shared by namespaces.
    devices: DeviceRegistry,
    /// RAID arrays and concats (`[[array]]`, `raid_create`).
    arrays: crate::arrays::Arrays,
    /// Volume stores (`[[lvstore]]`, `lvs_create`).
    lvstores: crate::lvstores::Lvstores,
    /// A supervised worker's NVMe-oF exports, held until its subsystems are settled (a host
    /// served before would see namespaces the guests changed since the configuration).
    held_exports: Option<Exports>,
}

/// NVMe/TCP exports grouped by listen address (one target per address), with the entries
/// they come from.
type Exports = Vec<Export>;

/// The controllers exported on one NVMe/TCP address (and the RDMA addresses they are
/// served on as well), and the entries they belong to.
struct Export {
    /// The NVMe/TCP listen address, none for an export over NVMe/RDMA only.
    tcp: Option<String>,
    rdma: Vec<String>,
    list: Vec<ExportSpec>,
    entries: Vec<usize>,
}

/// What the management plane knows of one controller.
#[derive(Clone, Debug)]
pub struct ControllerInfo {
    /// Configuration entry (`[[controller]]` index).
    pub entry: usize,
    pub cntlid: u16,
    /// "pf", "vf", "tcp" or "ctrl" (a vfio-user controller without VFs).
    pub kind: &'static str,
    /// VF number (1-based) of a VF.
    pub vf: Option<u16>,
    /// vfio-user socket, or the NVMe/TCP listen address.
    pub endpoint: String,
    pub stats: Arc<ControllerStats>,
    pub qos: Arc<QosControl>,
    /// The SR-IOV state a PF and its VFs share.
    pub virt: Option<VirtGroup>,
}

impl ControllerInfo {
    /// "ready", "disabled", "offline" (a VF not online) or "online" (a VF online, not yet
    /// enabled by its host).
    pub fn state(&self) -> &'static str {
        let ready = self.stats.ready.load(Ordering::Relaxed);
        let online = match (&self.virt, self.vf) {
            (Some(v), Some(n)) => v.vf_online(n),
            _ => true,
        };
        match (ready, online, self.vf.is_some()) {
            (true, _, _) => "ready",
            (false, false, _) => "offline",
            (false, true, true) => "online",
            (false, true, false) => "disabled",
        }
    }
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("sockets", &self.sockets())
            .finish()
    }
}

impl Daemon {
    /// Create every controller and start serving. Sockets are listening when this returns.
    pub fn start(cfg: &Config) -> Result<Self, DaemonError> {
        Self::start_as(cfg, false, &[])
    }

    /// [`Daemon::start`] as a supervised worker (`serve --supervised`): the process may be
    /// killed and replaced without the hosts seeing a power loss, so nothing acknowledged
    /// may live only in its memory (volume stores commit mapping changes before the ack).
    /// The configured subsystems numbered in `deleted` were deleted at run time: their
    /// entries stay empty.
    pub fn start_worker(cfg: &Config, deleted: &[usize]) -> Result<Self, DaemonError> {
        Self::start_as(cfg, true, deleted)
    }

    fn start_as(cfg: &Config, worker: bool, deleted: &[usize]) -> Result<Self, DaemonError> {
        crate::limits::apply();
        let place = Placement::new(cfg).map_err(|source| DaemonError::Io { index: 0, source })?;
        let mut daemon = Daemon {
            entries: Vec::new(),
            targets: Vec::new(),
            held_exports: (worker && crate::supervisor::handover::settles()).then(Vec::new),
            place,
            devices: DeviceRegistry::default(),
            arrays: crate::arrays::Arrays::new(worker),
            lvstores: crate::lvstores::Lvstores::new(worker),
        };
        for (i, a) in cfg.arrays.iter().enumerate() {
            let refused = daemon
                .arrays
                .create(a, &mut daemon.devices)
                .map_err(|why| DaemonError::Array { index: i, why })?;
            for r in refused {
                log::warn!("array {}: refused {r}", a.name);
            }
        }
        for (i, s) in cfg.lvstores.iter().enumerate() {
            daemon
                .lvstores
                .create(s, &mut daemon.devices, &mut daemon.arrays)
                .map_err(|why| DaemonError::Lvstore { index: i, why })?;
        }
        let mut exports = Exports::new();
        for (index, spec) in cfg.controllers.iter().enumerate() {
            if deleted.contains(&index) {
                daemon.entries.push(None);
                continue;
            }
            let e = Entry::start(
                index,
                spec,
                &mut daemon.place,
                &mut daemon.devices,
                (&mut daemon.arrays, &daemon.lvstores),
                &mut exports,
            )?;
            daemon.entries.push(Some(e));
        }
        daemon.start_targets(exports)?;
        Ok(daemon)
    }

    /// Start NVMe-oF targets (TCP, and RDMA where asked) for `exports`.
    fn start_targets(&mut self, exports: Exports) -> Result<(), DaemonError> {
        if let Some(held) = self.held_exports.as_mut() {
            held.extend(exports);
            return Ok(());
        }
        for Export {
            tcp: addr,
            rdma,
            list,
            entries,
        } in exports
        {
            let mut tcp_sa: Vec<SocketAddr> = Vec::new();
            let mut handed = Vec::new();
            if let Some(a) = &addr {
                let sa = a.parse().map_err(|_| DaemonError::Address(a.clone()))?;
                // a worker serves on the listener its supervisor holds (it outlives us)
                match crate::supervisor::handover::take_listener(a) {
                    Some(l) => handed.push(l),
                    None => tcp_sa.push(sa),
                }
            }
            let mut rdma_sa = Vec::new();
            for r in &rdma {
                rdma_sa.push(r.parse().map_err(|_| DaemonError::Address(r.clone()))?);
            }
            // a worker's supervisor keeps each connection, to close it gracefully should
            // the worker die
            let keep = crate::supervisor::kept_connections::hook();
            let t =
                TcpTarget::start_with(&tcp_sa, handed, &rdma_sa, list, keep).map_err(|source| {
                    DaemonError::Tcp {
                        addr: addr.clone().unwrap_or_else(|| rdma.join(",")),
                        source,
                    }
                })?;
            self.targets.push((entries, t));
        }
        Ok(())
    }

    fn entry(&self, index: usize) -> Option<&Entry> {
        self.entries.get(index)?.as_ref()
    }

    fn running(&self) -> impl Iterator<Item = (usize, &Entry)> {
        self.entries
            .iter()
            .enumerate()
            .filter_map(|(i, e)| Some((i, e.as_ref()?)))
    }

    /// Event counters of entry `index`'s first controller (configuration order).
    pub fn stats(&self, index: usize) -> Option<Arc<ControllerStats>> {
        Some(Arc::clone(&self.entry(index)?.controllers.first()?.stats))
    }

    /// Transfer counters (zero-copy vs bounced bytes) of namespace `nsid` of entry
    /// `index`, when it is an `nvme:` namespace.
    pub fn transfer_stats(&self, index: usize, nsid: u32) -> Option<Arc<TransferStats>> {
        self.entry(index)?
            .transfers
            .iter()
            .find(|(n, _)| *n == nsid)
            .map(|(_, t)| Arc::clone(t))
    }

    /// DMA regions the client of entry `index`'s first controller has mapped right now.
    pub fn dma_regions(&self, index: usize) -> Option<usize> {
        Some(self.entry(index)?.memory.snapshot().regions().len())
    }

    /// The QoS limits of entry `index`.
    pub fn qos(&self, index: usize) -> Option<QosLimits> {
        Some(self.entry(index)?.controllers.first()?.qos.get())
    }

    /// Addresses the NVMe/TCP targets listen on (ports chosen when 0 was configured).
    pub fn tcp_addrs(&self) -> Vec<SocketAddr> {
        self.targets
            .iter()
            .flat_map(|(_, t)| t.local_addrs().iter().copied())
            .collect()
    }

    /// Before a planned upgrade's exit: hang up on every NVMe-oF host, each connection
    /// closed gracefully, waiting up to `within` for the hosts to close theirs
    /// ([`TcpTarget::hang_up`]). Returns how many targets' hosts all closed in time, of
    /// how many.
    pub fn hang_up_hosts(&self, within: std::time::Duration) -> (usize, usize) {
        let deadline = std::time::Instant::now() + within;
        for (_, t) in &self.targets {
            t.hang_up(within);
        }
        // (a little past the targets' own deadline: each tells when its time is up)
        let margin = std::time::Duration::from_millis(100);
        let closed = self
            .targets
            .iter()
            .filter(|(_, t)| t.hung_up(deadline + margin) == Some(true))
            .count();
        (closed, self.targets.len())
    }

    /// The vfio-user sockets being served.
    pub fn sockets(&self) -> Vec<PathBuf> {
        self.running()
            .flat_map(|(_, e)| e.sockets().map(PathBuf::from))
            .collect()
    }

    /// Every controller with what the management plane shows of it, in build order.
    pub fn controllers(&self) -> Vec<ControllerInfo> {
        self.running()
            .flat_map(|(_, e)| e.controllers.iter().cloned())
            .collect()
    }

    /// Every controller as the metrics name it (`vnvme rpc stats`, the Prometheus
    /// endpoint), in build order.
    pub fn metric_sources(&self) -> Vec<crate::metrics::Source> {
        self.running()
            .flat_map(|(_, e)| {
                let nqn = e.subsystem.nqn().to_owned();
                e.controllers.iter().map(move |c| crate::metrics::Source {
                    cntlid: c.cntlid,
                    nqn: nqn.clone(),
                    kind: c.kind,
                    endpoint: c.endpoint.clone(),
                    stats: Arc::clone(&c.stats),
                })
            })
            .collect()
    }

    /// The running subsystems with their entry index.
    pub fn subsystems(&self) -> Vec<(usize, Arc<Subsystem>)> {
        self.running()
            .map(|(i, e)| (i, Arc::clone(&e.subsystem)))
            .collect()
    }

    /// The running subsystem named `nqn`.
    pub fn subsystem(&self, nqn: &str) -> Result<Arc<Subsystem>, MgmtError> {
        self.subsystems()
            .into_iter()
            .find(|(_, s)| s.nqn() == nqn)
            .map(|(_, s)| s)
            .ok_or_else(|| MgmtError::NoSubsystem(nqn.into()))
    }
}
