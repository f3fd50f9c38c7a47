//! Talking to an array from another thread (the management plane) while a reactor owns and
//! polls it: commands go by message (a channel drained in `poll`), status comes back as a
//! snapshot the array publishes now and then (never a lock on the I/O path: it only
//! `try_lock`s to publish).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Sender, channel};
use std::time::Duration;

use device_model::backend::Backend;

use super::array::Array;
use super::status::{AddOutcome, ArrayStatus, Command, Shared};
use super::superblock::Superblock;

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
