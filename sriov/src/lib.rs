//! The NVM subsystem and SR-IOV: how controllers of `device-model` are composed into one
//! subsystem (NVMe base 2.0 §3.2.1) and into a PF with VFs (§8.26).
//!
//! - [`subsystem`]: the subsystem's namespaces, their attachment to controllers, changes
//!   delivered to the controllers as messages, capacity;
//! - [`pool`]: where namespaces created at run time get their blocks;
//! - [`saved_namespaces`]: the namespaces as a supervised worker saves them for the next;
//! - [`virt`]: the primary controller's and secondaries' flexible resources, VF online and
//!   offline, VF Enable;
//! - [`topology`]: how a subsystem's controllers are numbered (CNTLIDs) and served (VF
//!   sockets).
//!
//! A controller sees all of this only through the `device_model::NvmSubsystem` and
//! `device_model::virt_link` traits.

#![forbid(unsafe_code)]

pub mod pool;
pub mod saved_namespaces;
pub mod subsystem;
pub mod topology;
pub mod virt;

pub use pool::{MemoryPool, NamespacePool};
pub use subsystem::{MAX_NAMESPACES, Settled, Subsystem};
pub use virt::{VirtGroup, VirtState};
