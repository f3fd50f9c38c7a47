//! The emulated NVMe controller, independent of any transport: PCI configuration space,
//! the BAR0 register file and doorbell page, admin and NVM command sets, queues, PRP/SGL
//! walking over guest memory, namespaces and their backends, and the polling reactor that
//! runs a controller's data plane.
//!
//! Layout: `pci/` config space and BAR layout; `registers.rs` the BAR0 register file;
//! `controller/` one controller, one file per hot-path hop (fetch, completion, interrupt)
//! and per lifecycle job (enable/reset, shutdown, detach); `queue/` SQ/CQ; `doorbell.rs`
//! and `shadow_doorbell.rs` the doorbells; `admin/` admin commands; `subsystem_link.rs` and
//! `virt_link.rs` what a controller asks of its NVM subsystem and SR-IOV pools (which live
//! in the `sriov` crate); `io.rs` NVM commands; `compound.rs` commands made of several
//! backend requests, Compare and Verify; `uncorrectable.rs` the blocks Write Uncorrectable
//! marked; `dptr.rs` PRP/SGL; `memory.rs` the DMA map; `backend/` null, malloc, file;
//! `reactor/` the thread and what runs beside its controllers.

#![deny(unsafe_code)] // unsafe only in the modules marked `allow(unsafe_code)` below

pub mod admin;
pub mod backend;
pub mod compound;
// a Compare's or Verify's media buffer handed to a backend as iovecs
#[allow(unsafe_code)]
pub mod compound_io;
pub mod controller;
pub mod doorbell;
// guest buffers as iovecs for backends and the kernel
#[allow(unsafe_code)]
pub mod dptr;
pub mod io;
pub mod irq;
pub mod irq_coalescing;
pub mod journal;
pub mod log_limit;
// guest memory (vm-memory regions from DMA_MAP fds)
#[allow(unsafe_code)]
pub mod memory;
// SIGBUS containment for truncated guest memory
#[allow(unsafe_code)]
pub mod memory_fault;
pub mod namespace;
pub mod pci;
pub mod qos;
pub mod queue;
pub mod quiesce;
pub mod reactor;
pub mod registers;
// guest queue rings read and written through a host pointer
#[allow(unsafe_code)]
pub mod ring_view;
pub mod shadow_doorbell;
pub mod state;
pub mod stats;
pub mod subsystem_link;
#[cfg(test)]
pub(crate) mod test_harness;
pub mod uncorrectable;
pub mod virt_link;

pub use controller::{Controller, ControllerConfig, FabricsIdentify, Restored};
pub use doorbell::Doorbells;
pub use memory::GuestMemory;
pub use namespace::Namespace;
pub use qos::{QosControl, QosLimits};
pub use reactor::{ControllerHandle, PollMode, Poller, Poster, Reactor};
pub use stats::ControllerStats;
pub use subsystem_link::{
    CommandTag, NamespaceChange, NsError, NvmSubsystem, SettleChange, SubsystemNamespace,
};
