//! The RDMA transport of NVMe over Fabrics (NVMe/RDMA transport specification 1.0; RoCE v2,
//! InfiniBand, iWARP: whatever rdma-core drives, Soft-RoCE included).
//!
//! Over RDMA a command capsule is one RDMA Send (64-byte command plus in-capsule data) into
//! a receive buffer the other side posted, a response capsule one Send of the 16-byte
//! completion; command data moves by RDMA Read and Write against the host's memory, named
//! in the command by a Keyed SGL Data Block (remote address, length, key). Queues are
//! set up with RDMA CM, whose private data carries the queue's ID and sizes (§3.2).
//!
//! The fabrics layer (Connect, Property Get/Set, Keep Alive, discovery, the exported
//! controller) is the one the TCP transport uses (`export/`); this module brings only what
//! is RDMA's:
//! - `verbs.rs`: the rdma-core bindings (the only unsafe code), loaded at run time;
//! - `cm_records.rs`: RDMA CM private data records;
//! - `sgl.rs`: a capsule's data pointer (keyed SGL or in-capsule);
//! - `link.rs`: one target connection (queue pair, receive buffers, reads and writes);
//! - `host_link.rs`: one initiator queue's connection (capsules out, responses in);
//! - `port.rs`: the target's listeners, protection domains and registered buffers.

pub mod cm_records;
pub mod sgl;

#[cfg(feature = "rdma")]
pub mod host_link;
#[cfg(feature = "rdma")]
pub mod link;
#[cfg(feature = "rdma")]
pub mod port;
#[cfg(feature = "rdma")]
pub mod verbs;

/// Whether this build has the RDMA transport (cargo feature `rdma`).
pub const AVAILABLE: bool = cfg!(feature = "rdma");
