//! Logical volumes: a volume store on any backend, with thick and thin volumes,
//! snapshots, clones, copy-on-write at 4 KiB granules and crash-consistent metadata.
//!
//! On disk (`superblock`, `records`, `checkpoint`): two superblock copies, a journal of
//! records (sequence number and CRC32C each) and two checkpoint slots, then the data
//! clusters. Reference counts and the free map are derived at load, never stored: a
//! crash may leak a cluster (allocated, not yet recorded), never hand one out twice.
//!
//! - [`superblock`]: the copies and the layout ([`Geometry`]);
//! - [`records`]: journal records, framing and the scan that finds the committed prefix;
//! - [`checkpoint`]: all metadata in one image, written when the journal fills and at load;
//! - [`map`]: a volume's cluster map entry (unmapped, full, layered granules);
//! - [`meta`]: volumes and maps in memory, where records apply;
//! - `store.rs`: the core (load, format, commit ordering, allocation);
//! - `commit_plan.rs`, `commit.rs`: a commit planned at its start, run step by step from
//!   the data path's poll;
//! - `ops.rs`: management (create, delete, resize, rename, snapshot, clone, inflate);
//! - `datapath.rs`, `direct.rs`, `cow.rs`, `fill.rs`: guest I/O (the general path and the
//!   fast path of a whole-cluster entry), copy-on-write, and partial granules copied up
//!   without waiting in place; `space.rs`: writes that wait for freed clusters;
//! - [`backend`]: [`Store`] and [`LvolBackend`] (a volume as a namespace backend);
//! - [`check`]: the offline checker.

// map code names a logical cluster `l`, an entry `e`, a request slot `r`: short by habit
#![allow(clippy::many_single_char_names)]

pub mod backend;
pub mod check;
pub mod checkpoint;
pub mod codec;
mod commit;
mod commit_plan;
mod cow;
mod datapath;
mod direct;
pub mod error;
mod fill;
mod inflight;
pub mod map;
pub mod meta;
mod ops;
pub mod records;
mod space;
mod store;
pub mod superblock;
mod syncio;

pub use backend::{DEFAULT_CLUSTER, LvolBackend, Store, StoreOptions, StoreStatus, probe, wipe};
pub use check::{CheckReport, check};
pub use datapath::WRITE_PROTECTED;
pub use error::LvolError;
pub use meta::MAX_VOLUME_CLUSTERS;
pub use ops::VolumeInfo;
pub use store::{Faults, LoadReport};
pub use superblock::Geometry;

#[cfg(test)]
pub(crate) mod tests;
