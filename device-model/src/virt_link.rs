//! A controller's place in an SR-IOV arrangement (NVMe base 2.0 §8.26, Virtualization
//! Enhancements): a primary controller (the PF) answers Virtualization Management (1Ch) and
//! Identify CNS 14h/15h from the resource pools it shares with its secondaries (the VFs); a
//! secondary runs only while online and with the resources it was given. The pools live in
//! the `sriov` crate, behind the traits here.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Resource types of Virtualization Management (CDW10 RT).
pub const RT_VQ: u8 = 0;
pub const RT_VI: u8 = 1;

/// Why a Virtualization Management command was refused (SCT 1h codes of §5.28).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VirtError {
    InvalidControllerId,
    InvalidSecondaryState,
    InvalidNumberOfResources,
    InvalidResourceId,
    InvalidField,
}

/// The resource pools as a primary controller reports them (Identify CNS 14h, Figure 282).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrimaryCapabilities {
    /// VQFRT, VQRFA, VQRFAP, VQPRT, VQFRSM.
    pub vq_total: u32,
    pub vq_assigned: u32,
    pub vq_primary: u16,
    pub vq_private: u16,
    pub vq_max: u16,
    /// VIFRT, VIRFA, VIRFAP, VIPRT, VIFRSM.
    pub vi_total: u32,
    pub vi_assigned: u32,
    pub vi_primary: u16,
    pub vi_private: u16,
    pub vi_max: u16,
}

/// One entry of the Secondary Controller List (Identify CNS 15h, Figure 284).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SecondaryEntry {
    pub scid: u16,
    pub vfn: u16,
    pub online: bool,
    pub nvq: u16,
    pub nvi: u16,
}

/// One secondary's assignments as a primary's journal carries them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SavedSecondary {
    pub scid: u16,
    pub nvq: u16,
    pub nvi: u16,
    pub online: bool,
}

/// The pools' assignments as a primary's journal carries them to the next worker: the
/// primary's flexible resources and each secondary's, and which secondaries are online.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SavedVirt {
    pub vq_primary: u16,
    pub vi_primary: u16,
    pub secondaries: Vec<SavedSecondary>,
}

/// What a primary controller asks of the pools it shares with its secondaries.
pub trait PrimaryPools: Send + Sync {
    /// Counts changes to the assignments (the primary saves them when it moved).
    fn generation(&self) -> u64;
    /// The assignments now.
    fn save(&self) -> SavedVirt;
    /// Put saved assignments back (a new worker, before any secondary runs), checked as
    /// Virtualization Management would check them. Until [`resume`](Self::resume), the
    /// host's replayed VF Enable changes nothing (the saved state is newer).
    fn restore(&self, saved: &SavedVirt) -> Result<(), VirtError>;
    /// The primary has restored: VF Enable applies again.
    fn resume(&self);
    /// Virtualization Management (§5.28): action `act` on resource type `rt` of controller
    /// `cntlid`, `nr` resources; dword 0 of the completion.
    fn manage(&self, act: u8, rt: u8, cntlid: u16, nr: u16) -> Result<u32, VirtError>;
    /// The pools (Identify CNS 14h).
    fn capabilities(&self) -> PrimaryCapabilities;
    /// Secondaries with SCID `from` or above, ascending, at most 127 (Identify CNS 15h).
    fn secondaries(&self, from: u16) -> Vec<SecondaryEntry>;
}

/// What a secondary controller asks of its primary's pools.
pub trait SecondaryResources: Send + Sync {
    /// Flexible queue resources assigned (admin queue included).
    fn queues(&self) -> u16;
}

/// A controller's role.
#[derive(Clone)]
pub enum VirtRole {
    /// The primary (PF).
    Primary(Arc<dyn PrimaryPools>),
    /// A secondary (VF): `online` is read on the data path without a lock.
    Secondary {
        online: Arc<AtomicBool>,
        resources: Arc<dyn SecondaryResources>,
    },
}

impl std::fmt::Debug for VirtRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VirtRole::Primary(_) => f.write_str("Primary"),
            VirtRole::Secondary { online, .. } => f
                .debug_struct("Secondary")
                .field("online", &online.load(Ordering::Relaxed))
                .finish(),
        }
    }
}

impl VirtRole {
    /// True for the primary controller.
    pub fn is_primary(&self) -> bool {
        matches!(self, VirtRole::Primary(_))
    }
}
