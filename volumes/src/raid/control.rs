//! Talking to an array from another thread (the management plane) while a reactor owns and
//! polls it: commands go by message (a channel drained in `poll`), status comes back as a
//! snapshot the array publishes now and then (never a lock on the I/O path: it only
//! `try_lock`s to publish).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use device_model::backend::Backend;

use super::array::{AddOutcome, Array};
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
    closed: AtomicBool,
    rate: AtomicU64,
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
    fn command_sent(&self) {
        self.commands.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn closed(&self) {
        self.closed.store(true, Ordering::Release);
    }
}

/// A handle on an array for the management plane.
#[derive(Clone)]
pub struct ArrayHandle {
    pub(crate) tx: Sender<Command>,
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for ArrayHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArrayHandle").finish()
    }
}

/// How long a command waits for the array to answer.
const ANSWER: Duration = Duration::from_secs(10);

impl ArrayHandle {
    /// The last published status.
    pub fn status(&self) -> ArrayStatus {
        self.shared
            .status
            .lock()
            .map(|g| g.clone())
            .unwrap_or_default()
    }

    /// True once the array was dropped (its namespace deleted).
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }

    /// Set the rebuild rate limit (bytes/s, 0: none).
    pub fn set_rate(&self, bytes_per_sec: u64, drive: Option<&mut Array>) {
        self.shared.rate.store(bytes_per_sec, Ordering::Relaxed);
        self.send(Command::SetRate(bytes_per_sec));
        if let Some(a) = drive {
            a.poll(&mut |_, _| {});
        }
    }

    fn send(&self, cmd: Command) -> bool {
        self.shared.command_sent();
        if self.tx.send(cmd).is_err() {
            self.shared.command_taken();
            return false;
        }
        true
    }

    /// Send a command and wait for its answer; `drive`: the array itself when no reactor
    /// polls it (it is polled here meanwhile).
    fn call<T>(
        &self,
        make: impl FnOnce(Sender<Result<T, String>>) -> Command,
        mut drive: Option<&mut Array>,
    ) -> Result<T, String> {
        let (tx, rx) = channel();
        if !self.send(make(tx)) {
            return Err("the array is gone".into());
        }
        let t = std::time::Instant::now();
        loop {
            if let Some(a) = drive.as_deref_mut() {
                a.poll(&mut |_, _| {});
            }
            match rx.recv_timeout(Duration::from_millis(if drive.is_some() { 1 } else { 50 })) {
                Ok(r) => return r,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Err("the array is gone".into());
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            }
            if t.elapsed() > ANSWER {
                return Err(
                    "the array did not answer (is its namespace's reactor running?)".into(),
                );
            }
        }
    }

    /// Add a member (a returning one, recognized by its superblock, gets a partial rebuild).
    pub fn add_member(
        &self,
        backend: Box<dyn Backend>,
        describe: String,
        sb: Option<Superblock>,
        drive: Option<&mut Array>,
    ) -> Result<AddOutcome, String> {
        self.call(
            |reply| Command::Add {
                backend,
                describe,
                sb,
                reply,
            },
            drive,
        )
    }

    /// Retire member `slot` (refused if it holds the last copy of some data).
    pub fn remove_member(&self, slot: usize, drive: Option<&mut Array>) -> Result<(), String> {
        self.call(|reply| Command::Remove { slot, reply }, drive)
    }
}
