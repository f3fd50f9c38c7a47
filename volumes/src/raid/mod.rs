//! RAID: concat, RAID 0, RAID 1 and RAID 10 over member backends.
//!
//! - [`layout`]: the strip mapping (array bytes to member extents), per level;
//! - [`superblock`]: what every member carries at its start (found again from the members
//!   alone after a restart; a foreign, stale or corrupt one is refused);
//! - [`bitmap`]: the write-intent bitmap (only dirty regions are resynced after a crash,
//!   only missed regions are copied to a returning member);
//! - [`rebuild`]: rate limit and progress of background copies; `rebuild_steps.rs` the array
//!   running them;
//! - [`status`]: what an array publishes and the commands it takes; `tags.rs` its member
//!   requests' size limit and tag kinds;
//! - [`array`]: the array as a `Backend`, its state and entry points; the work in
//!   `direct.rs` (one-strip requests straight to a member), `requests.rs` (split, fan out,
//!   gather, fail over), `rounds.rs` (superblock and bitmap writes), `step.rs` (what each
//!   poll runs), `manage.rs` (member changes), `publish.rs` (status);
//! - [`assemble`]: creating an array on members, and assembling one from them;
//! - [`control`]: the management plane's handle on an array a reactor owns;
//! - [`driver`]: the thread that steps an array while no reactor polls it.

pub mod array;
pub mod assemble;
pub mod bitmap;
pub mod control;
mod direct;
pub mod driver;
pub mod layout;
mod manage;
mod publish;
pub mod rebuild;
mod rebuild_steps;
mod records;
mod requests;
mod rounds;
pub mod status;
mod step;
pub mod superblock;
mod tags;

pub use array::Array;
pub use assemble::{ArrayError, Assembled, MemberIn, assemble, create, read_superblock, wipe};
pub use control::ArrayHandle;
pub use driver::DrivenArray;
pub use layout::{Level, MAX_MEMBERS};
pub use rebuild::{DEFAULT_RATE, Progress, RebuildKind};
pub use status::{AddOutcome, ArrayStatus, MemberStatus};
pub use superblock::{DATA_OFFSET, Superblock, SuperblockError};

/// Default strip size: 64 KiB.
pub const DEFAULT_STRIP: u64 = 64 << 10;

#[cfg(test)]
mod crash_tests;
#[cfg(test)]
#[allow(clippy::many_single_char_names)]
mod tests;
