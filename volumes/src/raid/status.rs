//! What an array and its management handles share: the status it publishes, the commands
//! it takes, and the outcome of adding a member.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use device_model::backend::Backend;

use super::rebuild::Progress;
use super::superblock::Superblock;

/// A member as listed.
#[derive(Clone, Debug, Default)]
pub struct MemberStatus {
    pub slot: usize,
    pub describe: String,
    /// "active", "rebuilding" or "missing".
    pub state: &'static str,
    /// Reads served (guest reads and rebuild reads are counted apart: these are guest's).
    pub reads: u64,
    pub writes: u64,
    pub errors: u64,
    pub outstanding: usize,
}

/// An array as listed.
#[derive(Clone, Debug, Default)]
pub struct ArrayStatus {
    pub name: String,
    pub uuid: String,
    pub level: &'static str,
    pub strip: u64,
    pub size: u64,
    /// "online", "degraded", "rebuilding" or "offline".
    pub state: &'static str,
    pub generation: u64,
    pub region_size: u64,
    /// Bitmap bits set (dirty or awaiting resync).
    pub dirty_regions: u64,
    /// Requests completed, and per second over the last interval.
    pub ops: u64,
    pub iops: f64,
    pub members: Vec<MemberStatus>,
    pub rebuild: Option<Progress>,
    pub last_rebuild: Option<Progress>,
    /// Rebuild rate limit, bytes/s (0: none).
    pub rate: u64,
}

/// What the management plane asks of an array.
pub enum Command {
    SetRate(u64),
    Remove {
        slot: usize,
        reply: Sender<Result<(), String>>,
    },
    Add {
        backend: Box<dyn Backend>,
        describe: String,
        /// The superblock the member carries, if any (a returning member).
        sb: Option<Superblock>,
        reply: Sender<Result<AddOutcome, String>>,
    },
}

/// State shared by an array and its handles.
#[derive(Debug, Default)]
pub struct Shared {
    pub(crate) status: Mutex<ArrayStatus>,
    pub(super) closed: AtomicBool,
    pub(super) rate: AtomicU64,
    /// Commands sent and not yet taken by the array (so it asks to be polled).
    commands: AtomicU64,
}

impl Shared {
    pub(crate) fn new(rate: u64) -> Arc<Self> {
        Arc::new(Self {
            rate: AtomicU64::new(rate),
            ..Self::default()
        })
    }
    pub(crate) fn initial_rate(&self) -> u64 {
        self.rate.load(Ordering::Relaxed)
    }
    pub(crate) fn commands_pending(&self) -> bool {
        self.commands.load(Ordering::Relaxed) > 0
    }
    pub(crate) fn command_taken(&self) {
        self.commands.fetch_sub(1, Ordering::Relaxed);
    }
    pub(crate) fn command_sent(&self) {
        self.commands.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn closed(&self) {
        self.closed.store(true, Ordering::Release);
    }
}

/// Where an added member went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddOutcome {
    pub slot: usize,
    /// Only the regions it missed are copied (a returning member).
    pub partial: bool,
}
