//! Changes to a running daemon: namespaces, QoS, VFs, entries added and removed.

use device_model::QosLimits;

use super::entry::Entry;
use super::topology::entry_nqn;
use super::{Daemon, Exports, MgmtError};
use crate::config::{Config, ControllerSpec, PollSetting};

impl Daemon {
    /// Create a namespace of `size` bytes in subsystem `nqn` (not attached).
    pub fn ns_create(
        &self,
        nqn: &str,
        size: u64,
        block_size: u32,
        shared: bool,
    ) -> Result<u32, MgmtError> {
        if block_size != 512 && block_size != 4096 {
            return Err(MgmtError::Invalid("block_size: 512 or 4096".into()));
        }
        let sub = self.subsystem(nqn)?;
        Ok(sub.create(size, block_size.trailing_zeros() as u8, shared)?)
    }

    /// Add a namespace on volume `backend` (`lvol:STORE/NAME`) to subsystem `nqn`, not
    /// attached (attach it with [`Daemon::ns_attach`]), as NSID `nsid` (default: the lowest
    /// free one, as SPDK's `nvmf_subsystem_add_ns`); its NSID. The subsystem must take
    /// namespaces at run time (a `namespace_pool`, or more than one controller).
    pub fn ns_add(
        &self,
        nqn: &str,
        backend: &str,
        block_size: u32,
        nsid: Option<u32>,
    ) -> Result<u32, MgmtError> {
        if block_size != 512 && block_size != 4096 {
            return Err(MgmtError::Invalid("block_size: 512 or 4096".into()));
        }
        let spec: crate::backend_spec::BackendSpec = backend
            .parse()
            .map_err(|e: crate::backend_spec::SpecError| MgmtError::Invalid(e.to_string()))?;
        let crate::backend_spec::BackendSpec::Lvol { store, volume } = spec else {
            return Err(MgmtError::Invalid(format!(
                "{backend}: ns_add takes a volume, lvol:STORE/NAME"
            )));
        };
        let sub = self.subsystem(nqn)?;
        if !sub.manages_namespaces() {
            return Err(MgmtError::Invalid(format!(
                "{nqn} has fixed namespaces (give it a namespace_pool or more controllers)"
            )));
        }
        let nsid = match nsid {
            Some(n) if n == 0 || n > sriov::MAX_NAMESPACES => {
                return Err(MgmtError::Invalid(format!(
                    "nsid: 1..={}",
                    sriov::MAX_NAMESPACES
                )));
            }
            Some(n) if sub.attached(n).is_some() => {
                return Err(MgmtError::Invalid(format!("{nqn} has a namespace {n}")));
            }
            Some(n) => n,
            None => (1..=sriov::MAX_NAMESPACES)
                .find(|&n| sub.attached(n).is_none())
                .ok_or_else(|| MgmtError::Invalid(format!("{nqn} has no free NSID")))?,
        };
        let b = self
            .lvstores
            .open(&store, &volume)
            .map_err(MgmtError::Invalid)?;
        if !b.size().is_multiple_of(u64::from(block_size)) {
            return Err(MgmtError::Invalid(format!(
                "{backend}: size is not a multiple of {block_size}"
            )));
        }
        let seed = format!("{nqn}#{backend}");
        sub.add_run_time_namespace(nsid, b, block_size.trailing_zeros() as u8, &seed);
        log::info!("{nqn}: namespace {nsid} added on {backend}");
        Ok(nsid)
    }

    /// A supervised worker, after its supervisor replayed the run-time changes: every
    /// subsystem's namespaces back as the last worker saved them. What changed, in total.
    pub fn settle_subsystems(&mut self) -> Result<serde_json::Value, MgmtError> {
        let mut total = sriov::Settled::default();
        for (_, e) in self.running() {
            let s = e.subsystem.settle();
            total.attached += s.attached;
            total.detached += s.detached;
            total.reopened += s.reopened;
            total.removed += s.removed;
            total.lost += s.lost;
        }
        // the hosts of NVMe-oF exports come in now, onto the settled namespaces
        if let Some(held) = self.held_exports.take() {
            self.start_targets(held).map_err(MgmtError::Daemon)?;
        }
        Ok(serde_json::json!({
            "attached": total.attached,
            "detached": total.detached,
            "reopened": total.reopened,
            "removed": total.removed,
            "lost": total.lost,
        }))
    }

    /// Delete namespace `nsid` of subsystem `nqn`, detaching it everywhere first.
    pub fn ns_delete(&self, nqn: &str, nsid: u32) -> Result<(), MgmtError> {
        self.subsystem(nqn)?.delete(nsid, None, true)?;
        Ok(())
    }

    /// Attach (`attach`) or detach namespace `nsid` of `nqn` for controllers `ctrls`;
    /// returns when every controller has applied it.
    pub fn ns_attach(
        &self,
        nqn: &str,
        nsid: u32,
        ctrls: &[u16],
        attach: bool,
    ) -> Result<(), MgmtError> {
        let sub = self.subsystem(nqn)?;
        if attach {
            sub.attach(nsid, ctrls, None, true)?;
        } else {
            sub.detach(nsid, ctrls, None, true)?;
        }
        Ok(())
    }

    /// Change the QoS limits of entry `index`'s controllers at run time (false: no such
    /// entry).
    pub fn set_qos(&self, index: usize, limits: QosLimits) -> bool {
        let Some(e) = self.entry(index) else {
            return false;
        };
        for c in &e.controllers {
            c.qos.set(limits);
        }
        true
    }

    /// Set the QoS limits of controller `cntlid`.
    pub fn set_controller_qos(&self, cntlid: u16, limits: QosLimits) -> Result<(), MgmtError> {
        let c = self
            .running()
            .flat_map(|(_, e)| e.controllers.iter())
            .find(|c| c.cntlid == cntlid)
            .ok_or(MgmtError::NoController(cntlid))?;
        c.qos.set(limits);
        Ok(())
    }

    /// SR-IOV: the first `n` VFs of subsystem `nqn` online (with default resources when they
    /// had none), the others offline; like writing NumVFs.
    pub fn enable_vfs(&self, nqn: &str, n: u16) -> Result<(), MgmtError> {
        let (_, entry) = self
            .running()
            .find(|(_, e)| e.subsystem.nqn() == nqn)
            .ok_or_else(|| MgmtError::NoSubsystem(nqn.into()))?;
        let virt = entry
            .controllers
            .iter()
            .find(|c| c.kind == "pf")
            .and_then(|c| c.virt.clone())
            .ok_or_else(|| MgmtError::Invalid(format!("{nqn} has no VFs")))?;
        if n > virt.total_vfs() {
            return Err(MgmtError::Invalid(format!(
                "{nqn} has {} VFs",
                virt.total_vfs()
            )));
        }
        virt.enable_vfs(n)
            .map_err(|e| MgmtError::Invalid(format!("{e:?}")))?;
        Ok(())
    }

    /// Start a new subsystem (a `[[controller]]` entry) at run time; returns its NQN.
    pub fn add_entry(&mut self, spec: &ControllerSpec) -> Result<String, MgmtError> {
        let mut all: Vec<ControllerSpec> = self.running().map(|(_, e)| e.spec.clone()).collect();
        all.push(spec.clone());
        let cfg = Config {
            poll: PollSetting::Adaptive,
            reactors: 0,
            metrics: None,
            controllers: all,
            arrays: Vec::new(),
            lvstores: Vec::new(),
        };
        cfg.validate()
            .map_err(|e| MgmtError::Invalid(e.to_string()))?;
        let index = self.entries.len();
        if index >= crate::config::MAX_ENTRIES {
            // entry numbers are not reused (CNTLIDs derive from them)
            return Err(MgmtError::Invalid(format!(
                "this daemon has made {index} subsystems, the most it numbers; restart it \
                 to make more"
            )));
        }
        let nqn = entry_nqn(index, spec);
        if self.subsystem(&nqn).is_ok() {
            return Err(MgmtError::Invalid(format!("{nqn} exists")));
        }
        let mut exports = Exports::new();
        let entry = Entry::start(
            index,
            spec,
            &mut self.place,
            &mut self.devices,
            (&mut self.arrays, &self.lvstores),
            &mut exports,
        )
        .map_err(MgmtError::Daemon)?;
        self.entries.push(Some(entry));
        if let Err(e) = self.start_targets(exports) {
            // undo what did start: the index is free again
            let _ = self.stop_entries(&|i| i == index);
            self.entries.truncate(index);
            return Err(MgmtError::Daemon(e));
        }
        Ok(nqn)
    }

    /// Take the next entry number without making a subsystem: a supervisor's replay of a
    /// subsystem made and deleted at run time, so the ones made after it get the same
    /// numbers (NQN and CNTLIDs) in every worker.
    pub fn skip_entry(&mut self) -> Result<(), MgmtError> {
        if self.entries.len() >= crate::config::MAX_ENTRIES {
            return Err(MgmtError::Invalid("no entry number left".into()));
        }
        self.entries.push(None);
        Ok(())
    }

    /// Stop subsystem `nqn` at run time: its controllers are reset, namespaces flushed,
    /// sockets removed; its backends, DMA map and counters are let go.
    pub fn remove_entry(&mut self, nqn: &str) -> Result<(), MgmtError> {
        let (index, _) = self
            .running()
            .find(|(_, e)| e.subsystem.nqn() == nqn)
            .ok_or_else(|| MgmtError::NoSubsystem(nqn.into()))?;
        if self
            .targets
            .iter()
            .any(|(entries, _)| entries.contains(&index) && entries.len() > 1)
        {
            return Err(MgmtError::Invalid(format!(
                "{nqn} shares its NVMe/TCP listener with other subsystems"
            )));
        }
        let r = self.stop_entries(&|i| i == index);
        self.entries[index] = None;
        r.map_err(MgmtError::Daemon)
    }

    /// Create (or assemble from its members) array `spec` at run time; what assembly
    /// refused.
    pub fn raid_create(
        &mut self,
        spec: &crate::config::ArraySpec,
    ) -> Result<Vec<String>, MgmtError> {
        self.arrays
            .create(spec, &mut self.devices)
            .map_err(MgmtError::Invalid)
    }

    /// Delete array `name` (not while a namespace uses it); its members' superblocks are
    /// wiped.
    pub fn raid_delete(&mut self, name: &str) -> Result<(), MgmtError> {
        self.arrays
            .delete(name, &mut self.devices)
            .map_err(MgmtError::Invalid)
    }

    /// Add member `spec` to array `name`.
    pub fn raid_add_member(
        &mut self,
        name: &str,
        spec: &str,
    ) -> Result<volumes::raid::AddOutcome, MgmtError> {
        self.arrays
            .add_member(name, spec, &mut self.devices)
            .map_err(MgmtError::Invalid)
    }

    /// Retire member `member` (spec or slot) of array `name`; its slot and spec.
    pub fn raid_remove_member(
        &mut self,
        name: &str,
        member: &str,
    ) -> Result<(usize, String), MgmtError> {
        self.arrays
            .remove_member(name, member)
            .map_err(MgmtError::Invalid)
    }

    /// Set array `name`'s rebuild rate limit (MB/s, 0: none).
    pub fn raid_set_rebuild_rate(&mut self, name: &str, mb_per_sec: u64) -> Result<(), MgmtError> {
        self.arrays
            .set_rate(name, mb_per_sec)
            .map_err(MgmtError::Invalid)
    }

    /// Load or make volume store `spec` at run time.
    pub fn lvs_create(
        &mut self,
        spec: &crate::config::LvstoreSpec,
    ) -> Result<crate::lvstores::Made, MgmtError> {
        self.lvstores
            .create(spec, &mut self.devices, &mut self.arrays)
            .map_err(MgmtError::Invalid)
    }

    /// Delete volume store `name` (not while a volume of it is in use).
    pub fn lvs_delete(&mut self, name: &str) -> Result<(), MgmtError> {
        self.lvstores.delete(name).map_err(MgmtError::Invalid)
    }

    /// The volume stores.
    pub fn lvstores(&self) -> &crate::lvstores::Lvstores {
        &self.lvstores
    }

    /// The arrays' status.
    /// Bytes array member `spec` moved zero-copy and bounced (`nvme:` members).
    pub fn raid_member_transfer(&self, spec: &str) -> Option<(u64, u64)> {
        self.arrays.member_transfer(spec)
    }

    pub fn raid_list(
        &mut self,
    ) -> Vec<(
        volumes::raid::ArrayStatus,
        Option<String>,
        Vec<String>,
        bool,
    )> {
        self.arrays.list()
    }
}
