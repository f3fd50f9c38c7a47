//! What a controller knows of the NVM subsystem it belongs to (NVMe base 2.0 §3.2.1): the
//! subsystem's namespaces and controllers, and the Namespace Management (§5.20) and
//! Namespace Attachment (§5.19) requests it forwards there. The subsystem itself lives in
//! the `sriov` crate; it tells a controller about changes to its namespaces with
//! [`NamespaceChange`] messages the controller applies itself (through its reactor's
//! [`crate::Poster`], or returned to the caller for a controller without one).

use nvme_spec::Status;
use nvme_spec::status::sct;

use crate::namespace::{Namespace, NsIds};

/// The subsystem a controller belongs to, as its admin commands see it.
pub trait NvmSubsystem: Send + Sync {
    /// The subsystem NQN.
    fn nqn(&self) -> &str;
    /// Namespaces can change at run time (Namespace Management and Attachment answer).
    fn manages_namespaces(&self) -> bool;
    /// One namespace, attached anywhere or not (Identify CNS 11h).
    fn namespace(&self, nsid: u32) -> Option<SubsystemNamespace>;
    /// CNTLIDs of every controller, ascending (Identify CNS 13h).
    fn controllers(&self) -> Vec<u16>;
    /// CNTLIDs namespace `nsid` is attached to (Identify CNS 12h); `None`: not allocated.
    fn attached(&self, nsid: u32) -> Option<Vec<u16>>;
    /// Allocated NSIDs above `after`, ascending (Identify CNS 10h).
    fn allocated(&self, after: u32) -> Vec<u32>;
    /// Highest NSID (Identify NN).
    fn max_nsid(&self) -> u32;
    /// Namespaces it can hold at most (Identify MNAN).
    fn max_namespaces(&self) -> u32;
    /// Total and unallocated NVM capacity in bytes (Identify TNVMCAP, UNVMCAP).
    fn capacity(&self) -> (u64, u64);
    /// Create a namespace of `size` bytes with `2^lba_shift`-byte blocks, not attached;
    /// returns its NSID (§5.20, SEL 0).
    /// `tag`: the command asking, when a journal records it (see [`NvmSubsystem::applied`]).
    fn create(
        &self,
        size: u64,
        lba_shift: u8,
        shared: bool,
        tag: Option<CommandTag>,
    ) -> Result<u32, NsError>;
    /// Delete namespace `nsid` (all with FFFFFFFFh), detached everywhere first (§5.20,
    /// SEL 1), on behalf of controller `me`. Returns the changes for `me` to apply now
    /// (when it has no reactor to receive them on).
    fn delete(
        &self,
        nsid: u32,
        me: u16,
        tag: Option<CommandTag>,
    ) -> Result<Vec<NamespaceChange>, NsError>;
    /// Attach namespace `nsid` to `ctrls` (§5.19, SEL 0) on behalf of `me`; as `delete`.
    fn attach(
        &self,
        nsid: u32,
        ctrls: &[u16],
        me: u16,
        tag: Option<CommandTag>,
    ) -> Result<Vec<NamespaceChange>, NsError>;
    /// Detach namespace `nsid` from `ctrls` (§5.19, SEL 1) on behalf of `me`; as `delete`.
    fn detach(
        &self,
        nsid: u32,
        ctrls: &[u16],
        me: u16,
        tag: Option<CommandTag>,
    ) -> Result<Vec<NamespaceChange>, NsError>;
    /// Dword 0 of the change command `tag` made, if it is the last change a command made and
    /// it was saved: a supervised worker died after saving the change and before the
    /// command's completion was journalled, and the next worker runs the command again (it
    /// must answer as the first run would have, not change anything twice).
    fn applied(&self, tag: CommandTag) -> Option<u32> {
        let _ = tag;
        None
    }
}

/// An admin command as a supervised worker's journal knows it (its fetch record): the same
/// command run again after a crash has the same tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandTag {
    /// Its number among the admin SQ's fetches and its position there.
    pub seq: u32,
    pub sq_pos: u32,
    pub cid: u16,
    pub opcode: u8,
}

impl std::fmt::Debug for dyn NvmSubsystem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmSubsystem")
            .field("nqn", &self.nqn())
            .finish_non_exhaustive()
    }
}

/// A change of one controller's namespaces, which it applies itself.
#[derive(Debug)]
pub enum NamespaceChange {
    /// Take this namespace (a handle on its backend).
    Attach(Namespace),
    /// Namespace NSID leaves this controller.
    Detach(u32),
    /// A namespace put back as an earlier worker left it (a new worker settling its
    /// subsystem before any host is served again): taken or let go with no notice, as the
    /// host heard of it from that worker already.
    Settle(SettleChange),
}

/// A quiet [`NamespaceChange::Settle`].
#[derive(Debug)]
pub enum SettleChange {
    Attach(Namespace),
    Detach(u32),
}

/// What the subsystem says about one namespace (listings, Identify CNS 11h).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubsystemNamespace {
    pub nsid: u32,
    pub size: u64,
    pub lba_shift: u8,
    pub shared: bool,
    pub attached: Vec<u16>,
    /// Created by Namespace Management from the pool.
    pub pooled: bool,
    /// NGUID, EUI-64 and UUID, as its controllers report them.
    pub ids: NsIds,
}

/// Why a namespace change was refused (the status codes of §5.19 and §5.20).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NsError {
    #[error("no such namespace")]
    InvalidNamespace,
    #[error("invalid field")]
    InvalidField,
    #[error("unsupported LBA format")]
    InvalidFormat,
    #[error("not enough unallocated capacity")]
    InsufficientCapacity,
    #[error("no namespace ID left")]
    IdUnavailable,
    #[error("namespace already attached to controller {0:#x}")]
    AlreadyAttached(u16),
    #[error("namespace is private (NMIC 0): one controller at most")]
    Private,
    #[error("namespace not attached to controller {0:#x}")]
    NotAttached(u16),
    #[error("controller list invalid")]
    ControllerListInvalid,
    #[error("thin provisioning not supported (NCAP must equal NSZE)")]
    ThinProvisioning,
    #[error("namespaces of this subsystem are fixed (one controller, no namespace pool)")]
    Fixed,
    #[error("backend: {0}")]
    Backend(String),
}

impl NsError {
    /// The completion status for this refusal.
    pub fn status(&self) -> Status {
        let cs = |sc| Status::dnr(sct::COMMAND_SPECIFIC, sc);
        match self {
            NsError::InvalidNamespace => Status::INVALID_NAMESPACE,
            NsError::InvalidField | NsError::Fixed => Status::INVALID_FIELD,
            NsError::InvalidFormat => Status::INVALID_FORMAT,
            NsError::InsufficientCapacity => cs(0x15),
            NsError::IdUnavailable => cs(0x16),
            NsError::AlreadyAttached(_) => cs(0x18),
            NsError::Private => cs(0x19),
            NsError::NotAttached(_) => cs(0x1a),
            NsError::ThinProvisioning => cs(0x1b),
            NsError::ControllerListInvalid => cs(0x1c),
            NsError::Backend(_) => Status::INTERNAL_ERROR,
        }
    }
}
