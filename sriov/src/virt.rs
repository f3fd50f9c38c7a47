//! NVMe Virtualization Enhancements (base 2.0 §8.26): a primary controller (the SR-IOV PF)
//! and its secondary controllers (VFs) share pools of flexible resources: VQ (queue pairs,
//! admin included) and VI (interrupt vectors). The primary hands them out with
//! Virtualization Management (1Ch) and reports them in Identify CNS 14h/15h; a secondary
//! runs only while online, and only with what it was given.
//!
//! The state is shared by the controllers of one subsystem (each in its reactor) behind a
//! mutex ([`VirtGroup`]), touched by admin commands, controller enable and the management
//! plane only; `online` is an atomic so a secondary's data plane checks it without the lock.
//! The SR-IOV capability's VF Enable / NumVFs ([`VirtGroup::enable_vfs`]) brings VFs online
//! the way a PF driver would.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use device_model::virt_link::{
    PrimaryCapabilities, PrimaryPools, RT_VI, RT_VQ, SavedSecondary, SavedVirt, SecondaryEntry,
    SecondaryResources, VirtError, VirtRole,
};

/// Queue resources of a VF brought online by VF Enable or the management plane: an admin
/// queue and 4 I/O queues.
pub const VF_DEFAULT_QUEUES: u16 = 5;
/// Interrupt resources of a VF brought online that way.
pub const VF_DEFAULT_VECTORS: u16 = 5;
/// The primary's private resources (VQPRT, VIPRT): as many queues and vectors as a
/// controller has without virtualization (64 I/O queues and the admin queue).
const PRIMARY_PRIVATE: u16 = 65;
/// Most flexible resources one secondary may have (VQFRSM, VIFRSM).
const SECONDARY_MAX: u16 = 9;

/// One secondary controller.
#[derive(Debug)]
pub struct Secondary {
    /// Secondary controller ID (its CNTLID).
    pub scid: u16,
    /// Virtual function number (1-based).
    pub vfn: u16,
    /// Flexible queue resources assigned (admin queue included).
    pub nvq: u16,
    /// Flexible interrupt resources assigned.
    pub nvi: u16,
    online: Arc<AtomicBool>,
}

impl Secondary {
    /// Whether the secondary is online.
    pub fn online(&self) -> bool {
        self.online.load(Ordering::Acquire)
    }
}

/// Flexible resource pools of a primary and its secondaries.
#[derive(Debug)]
pub struct VirtState {
    pub primary_cntlid: u16,
    /// Flexible VQ and VI in total (VQFRT, VIFRT).
    pub vq_total: u32,
    pub vi_total: u32,
    /// Flexible resources the primary keeps (VQRFAP, VIRFAP).
    pub vq_primary: u16,
    pub vi_primary: u16,
    /// The primary's private resources (VQPRT, VIPRT).
    pub vq_private: u16,
    pub vi_private: u16,
    /// Most flexible resources one secondary may have (VQFRSM, VIFRSM).
    pub vq_max: u16,
    pub vi_max: u16,
    pub secondaries: Vec<Secondary>,
}

impl VirtState {
    /// A primary `primary_cntlid` with `vfs` secondaries numbered `first_scid..`; each
    /// secondary may get up to `vq_max` queues and `vi_max` vectors, and the pools hold
    /// enough for every secondary to have its maximum.
    pub fn new(
        primary_cntlid: u16,
        vq_private: u16,
        vi_private: u16,
        vfs: u16,
        first_scid: u16,
        vq_max: u16,
        vi_max: u16,
    ) -> Self {
        Self {
            primary_cntlid,
            vq_total: u32::from(vfs) * u32::from(vq_max),
            vi_total: u32::from(vfs) * u32::from(vi_max),
            vq_primary: 0,
            vi_primary: 0,
            vq_private,
            vi_private,
            vq_max,
            vi_max,
            secondaries: (0..vfs)
                .map(|i| Secondary {
                    scid: first_scid + i,
                    vfn: i + 1,
                    nvq: 0,
                    nvi: 0,
                    online: Arc::new(AtomicBool::new(false)),
                })
                .collect(),
        }
    }

    /// Flexible resources of type `rt` assigned to secondaries.
    pub fn assigned(&self, rt: u8) -> u32 {
        self.secondaries
            .iter()
            .map(|s| u32::from(if rt == RT_VQ { s.nvq } else { s.nvi }))
            .sum()
    }

    fn secondary(&mut self, scid: u16) -> Result<&mut Secondary, VirtError> {
        self.secondaries
            .iter_mut()
            .find(|s| s.scid == scid)
            .ok_or(VirtError::InvalidControllerId)
    }

    /// Give every secondary `nvq` queues and `nvi` vectors and set it online (the
    /// configuration's shortcut for the simple case).
    pub fn all_online(&mut self, nvq: u16, nvi: u16) {
        for s in &mut self.secondaries {
            s.nvq = nvq.min(self.vq_max);
            s.nvi = nvi.min(self.vi_max);
            s.online.store(true, Ordering::Release);
        }
    }

    /// The management plane's NumVFs: secondaries `1..=n` online (given `nvq`/`nvi` first
    /// when they have fewer than they need to run), the others offline. Stops at the first
    /// refusal (pools exhausted).
    pub fn set_enabled(&mut self, n: usize, nvq: u16, nvi: u16) -> Result<(), VirtError> {
        let ids: Vec<(u16, bool, bool)> = self
            .secondaries
            .iter()
            .map(|s| (s.scid, s.online(), s.nvq >= 2 && s.nvi >= 1))
            .collect();
        for (k, (scid, online, resourced)) in ids.into_iter().enumerate() {
            if k >= n {
                self.manage(0x7, 0, scid, 0)?;
                continue;
            }
            if online {
                continue;
            }
            if !resourced {
                self.manage(0x8, RT_VQ, scid, nvq)?;
                self.manage(0x8, RT_VI, scid, nvi)?;
            }
            self.manage(0x9, 0, scid, 0)?;
        }
        Ok(())
    }

    /// Put `saved` back: every secondary offline and without resources first, then the
    /// primary's and each secondary's resources and online states, each step checked as
    /// Virtualization Management checks it (a refusal stops there).
    pub fn restore(&mut self, saved: &SavedVirt) -> Result<(), VirtError> {
        // checked on a copy first: a refused state leaves this one (and every VF) as it was
        self.detached_copy().apply(saved)?;
        self.apply(saved)
    }

    /// A copy whose secondaries' online flags are its own (the VFs do not see it).
    fn detached_copy(&self) -> Self {
        Self {
            secondaries: self
                .secondaries
                .iter()
                .map(|s| Secondary {
                    online: Arc::new(AtomicBool::new(s.online())),
                    ..*s
                })
                .collect(),
            ..*self
        }
    }

    fn apply(&mut self, saved: &SavedVirt) -> Result<(), VirtError> {
        let scids: Vec<u16> = self.secondaries.iter().map(|s| s.scid).collect();
        for &scid in &scids {
            self.manage(0x7, 0, scid, 0)?;
            self.manage(0x8, RT_VQ, scid, 0)?;
            self.manage(0x8, RT_VI, scid, 0)?;
        }
        let primary = self.primary_cntlid;
        self.manage(0x1, RT_VQ, primary, saved.vq_primary)?;
        self.manage(0x1, RT_VI, primary, saved.vi_primary)?;
        for s in &saved.secondaries {
            self.manage(0x8, RT_VQ, s.scid, s.nvq)?;
            self.manage(0x8, RT_VI, s.scid, s.nvi)?;
            if s.online {
                self.manage(0x9, 0, s.scid, 0)?;
            }
        }
        Ok(())
    }

    /// Virtualization Management (§5.28): `act` on resource type `rt` of controller
    /// `cntlid`, `nr` resources. Returns the number of resources modified (dword 0).
    pub fn manage(&mut self, act: u8, rt: u8, cntlid: u16, nr: u16) -> Result<u32, VirtError> {
        let rt_ok = rt == RT_VQ || rt == RT_VI;
        match act {
            // primary flexible allocation
            0x1 => {
                if cntlid != self.primary_cntlid {
                    return Err(VirtError::InvalidControllerId);
                }
                if !rt_ok {
                    return Err(VirtError::InvalidResourceId);
                }
                let total = if rt == RT_VQ {
                    self.vq_total
                } else {
                    self.vi_total
                };
                if u32::from(nr) + self.assigned(rt) > total {
                    return Err(VirtError::InvalidNumberOfResources);
                }
                if rt == RT_VQ {
                    self.vq_primary = nr;
                } else {
                    self.vi_primary = nr;
                }
                Ok(u32::from(nr))
            }
            // secondary offline
            0x7 => {
                let s = self.secondary(cntlid)?;
                s.online.store(false, Ordering::Release);
                Ok(0)
            }
            // secondary assign
            0x8 => {
                if !rt_ok {
                    return Err(VirtError::InvalidResourceId);
                }
                let (max, total, primary) = if rt == RT_VQ {
                    (self.vq_max, self.vq_total, self.vq_primary)
                } else {
                    (self.vi_max, self.vi_total, self.vi_primary)
                };
                let others = {
                    let s = self.secondary(cntlid)?;
                    if s.online() {
                        return Err(VirtError::InvalidSecondaryState);
                    }
                    u32::from(if rt == RT_VQ { s.nvq } else { s.nvi })
                };
                let others = self.assigned(rt) - others;
                if nr > max || others + u32::from(nr) + u32::from(primary) > total {
                    return Err(VirtError::InvalidNumberOfResources);
                }
                let s = self.secondary(cntlid)?;
                if rt == RT_VQ {
                    s.nvq = nr;
                } else {
                    s.nvi = nr;
                }
                Ok(u32::from(nr))
            }
            // secondary online: an admin queue and an I/O queue, and a vector
            0x9 => {
                let s = self.secondary(cntlid)?;
                if s.nvq < 2 || s.nvi < 1 {
                    return Err(VirtError::InvalidNumberOfResources);
                }
                s.online.store(true, Ordering::Release);
                Ok(0)
            }
            _ => Err(VirtError::InvalidField),
        }
    }
}

/// The pools a PF and its VFs share, behind their lock: what the primary's admin commands,
/// the secondaries' enable and the management plane all use.
#[derive(Clone, Debug)]
pub struct VirtGroup(Arc<Shared>);

#[derive(Debug)]
struct Shared {
    state: Mutex<VirtState>,
    /// Counts changes (read by the primary's poll without the lock).
    generation: AtomicU64,
    /// Restored from a journal, the primary not yet: a replayed VF Enable changes nothing.
    replaying: AtomicBool,
}

impl VirtGroup {
    /// A primary `primary_cntlid` with `vfs` secondaries numbered `first_scid..`.
    pub fn new(primary_cntlid: u16, vfs: u16, first_scid: u16) -> Self {
        Self(Arc::new(Shared {
            state: Mutex::new(VirtState::new(
                primary_cntlid,
                PRIMARY_PRIVATE,
                PRIMARY_PRIVATE,
                vfs,
                first_scid,
                SECONDARY_MAX,
                SECONDARY_MAX,
            )),
            generation: AtomicU64::new(0),
            replaying: AtomicBool::new(false),
        }))
    }

    /// The state (a panic while holding it left it consistent: keep using it).
    pub fn lock(&self) -> MutexGuard<'_, VirtState> {
        self.0
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every VF online with the default resources (the configuration's `vfs_online`).
    pub fn all_online(&self) {
        self.lock()
            .all_online(VF_DEFAULT_QUEUES, VF_DEFAULT_VECTORS);
        self.changed();
    }

    fn changed(&self) {
        self.0.generation.fetch_add(1, Ordering::Release);
    }

    /// VFs `1..=n` online (given the default resources when they have too few), the others
    /// offline: PCIe SR-IOV VF Enable with NumVFs = `n`, or `vf_enable` of the management
    /// plane.
    pub fn enable_vfs(&self, n: u16) -> Result<(), VirtError> {
        let r = self
            .lock()
            .set_enabled(usize::from(n), VF_DEFAULT_QUEUES, VF_DEFAULT_VECTORS);
        self.changed();
        r
    }

    /// PCIe SR-IOV VF Enable with NumVFs = `n` written by the PF's host: [`enable_vfs`]
    /// unless the state came from a journal and the PF has not restored yet (the host's
    /// configuration writes replayed to a new worker: the journal's state is newer).
    ///
    /// [`enable_vfs`]: Self::enable_vfs
    pub fn vf_enable_written(&self, n: u16) -> Result<(), VirtError> {
        if self.0.replaying.load(Ordering::Acquire) {
            log::debug!("SR-IOV: replayed VF Enable ({n} VFs) left to the saved state");
            return Ok(());
        }
        self.enable_vfs(n)
    }

    /// Number of VFs (TotalVFs).
    pub fn total_vfs(&self) -> u16 {
        self.lock().secondaries.len() as u16
    }

    /// Whether VF `vf` (1-based) is online.
    pub fn vf_online(&self, vf: u16) -> bool {
        self.lock()
            .secondaries
            .get(usize::from(vf).wrapping_sub(1))
            .is_some_and(Secondary::online)
    }

    /// The primary controller's role.
    pub fn primary_role(&self) -> VirtRole {
        VirtRole::Primary(Arc::new(self.clone()))
    }

    /// The role of secondary `index` (VF `index + 1`).
    pub fn secondary_role(&self, index: usize) -> VirtRole {
        let online = Arc::clone(&self.lock().secondaries[index].online);
        VirtRole::Secondary {
            online,
            resources: Arc::new(SecondaryHandle {
                group: self.clone(),
                index,
            }),
        }
    }
}

impl PrimaryPools for VirtGroup {
    fn manage(&self, act: u8, rt: u8, cntlid: u16, nr: u16) -> Result<u32, VirtError> {
        let r = self.lock().manage(act, rt, cntlid, nr);
        self.changed();
        r
    }

    fn generation(&self) -> u64 {
        self.0.generation.load(Ordering::Acquire)
    }

    fn save(&self) -> SavedVirt {
        let v = self.lock();
        SavedVirt {
            vq_primary: v.vq_primary,
            vi_primary: v.vi_primary,
            secondaries: v
                .secondaries
                .iter()
                .map(|s| SavedSecondary {
                    scid: s.scid,
                    nvq: s.nvq,
                    nvi: s.nvi,
                    online: s.online(),
                })
                .collect(),
        }
    }

    fn restore(&self, saved: &SavedVirt) -> Result<(), VirtError> {
        self.lock().restore(saved)?;
        // only a state put back is newer than the host's replayed VF Enable
        self.0.replaying.store(true, Ordering::Release);
        self.changed();
        Ok(())
    }

    fn resume(&self) {
        self.0.replaying.store(false, Ordering::Release);
    }

    fn capabilities(&self) -> PrimaryCapabilities {
        let v = self.lock();
        PrimaryCapabilities {
            vq_total: v.vq_total,
            vq_assigned: v.assigned(RT_VQ),
            vq_primary: v.vq_primary,
            vq_private: v.vq_private,
            vq_max: v.vq_max,
            vi_total: v.vi_total,
            vi_assigned: v.assigned(RT_VI),
            vi_primary: v.vi_primary,
            vi_private: v.vi_private,
            vi_max: v.vi_max,
        }
    }

    fn secondaries(&self, from: u16) -> Vec<SecondaryEntry> {
        self.lock()
            .secondaries
            .iter()
            .filter(|s| s.scid >= from)
            .take(127)
            .map(|s| SecondaryEntry {
                scid: s.scid,
                vfn: s.vfn,
                online: s.online(),
                nvq: s.nvq,
                nvi: s.nvi,
            })
            .collect()
    }
}

/// A secondary's view of the pools.
struct SecondaryHandle {
    group: VirtGroup,
    index: usize,
}

impl SecondaryResources for SecondaryHandle {
    fn queues(&self) -> u16 {
        self.group.lock().secondaries[self.index].nvq
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_are_accounted_and_states_enforced() {
        let mut v = VirtState::new(1, 9, 9, 2, 2, 4, 2);
        assert_eq!((v.vq_total, v.vi_total), (8, 4));
        // online needs resources
        assert_eq!(
            v.manage(9, 0, 2, 0),
            Err(VirtError::InvalidNumberOfResources)
        );
        assert_eq!(v.manage(8, RT_VQ, 2, 4), Ok(4));
        assert_eq!(v.manage(8, RT_VI, 2, 1), Ok(1));
        assert_eq!(
            v.manage(8, RT_VQ, 2, 5),
            Err(VirtError::InvalidNumberOfResources)
        );
        assert_eq!(v.manage(8, 3, 2, 1), Err(VirtError::InvalidResourceId));
        assert_eq!(
            v.manage(8, RT_VQ, 9, 1),
            Err(VirtError::InvalidControllerId)
        );
        assert_eq!(v.manage(9, 0, 2, 0), Ok(0));
        assert!(v.secondaries[0].online());
        // no assignment while online
        assert_eq!(
            v.manage(8, RT_VQ, 2, 2),
            Err(VirtError::InvalidSecondaryState)
        );
        // the pool: 8 VQ, 4 to secondary 2; the primary takes 3, secondary 3 may get 1
        assert_eq!(v.manage(1, RT_VQ, 1, 3), Ok(3));
        assert_eq!(
            v.manage(8, RT_VQ, 3, 2),
            Err(VirtError::InvalidNumberOfResources)
        );
        assert_eq!(v.manage(8, RT_VQ, 3, 1), Ok(1));
        assert_eq!(
            v.manage(1, RT_VQ, 1, 4),
            Err(VirtError::InvalidNumberOfResources)
        );
        assert_eq!(
            v.manage(1, RT_VQ, 2, 1),
            Err(VirtError::InvalidControllerId)
        );
        assert_eq!(v.manage(7, 0, 2, 0), Ok(0));
        assert!(!v.secondaries[0].online());
        assert_eq!(v.manage(5, 0, 2, 0), Err(VirtError::InvalidField));
    }

    /// Saved assignments come back exactly in a new group; ones the pools cannot hold are
    /// refused; a replayed VF Enable changes nothing until the primary resumes.
    #[test]
    fn saved_assignments_come_back_and_replayed_vf_enable_waits() {
        let g = VirtGroup::new(1, 3, 2);
        g.enable_vfs(2).unwrap();
        g.manage(0x7, 0, 3, 0).unwrap(); // VF2 offline by the PF's host
        g.manage(0x1, RT_VQ, 1, 4).unwrap();
        let saved = g.save();
        let h = VirtGroup::new(1, 3, 2);
        let before = h.generation();
        h.restore(&saved).unwrap();
        assert_eq!(h.save(), saved);
        assert!(h.generation() > before);
        assert!(h.vf_online(1) && !h.vf_online(2) && !h.vf_online(3));
        h.vf_enable_written(2).unwrap(); // the host's VF Enable, replayed
        assert!(
            !h.vf_online(2),
            "a replayed VF Enable undid the saved state"
        );
        h.resume();
        h.vf_enable_written(3).unwrap();
        assert!(h.vf_online(2) && h.vf_online(3));
        // more than a secondary may have: refused
        let mut bad = saved.clone();
        bad.secondaries[0].nvq = 200;
        assert_eq!(
            VirtGroup::new(1, 3, 2).restore(&bad),
            Err(VirtError::InvalidNumberOfResources)
        );
        let mut bad = saved;
        bad.secondaries[0].scid = 77;
        assert_eq!(
            VirtGroup::new(1, 3, 2).restore(&bad),
            Err(VirtError::InvalidControllerId)
        );
        // a refused state changes nothing (no VF half reset) and the host's VF Enable applies
        let k = VirtGroup::new(1, 3, 2);
        k.enable_vfs(2).unwrap();
        let kept = k.save();
        bad.secondaries[0].scid = 2;
        bad.secondaries[2].nvq = 200;
        assert_eq!(k.restore(&bad), Err(VirtError::InvalidNumberOfResources));
        assert_eq!(k.save(), kept, "a refused restore changed the state");
        k.vf_enable_written(3).unwrap();
        assert!(k.vf_online(3), "VF Enable ignored after a refused restore");
    }
}
