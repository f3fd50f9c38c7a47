//! End-to-end tests live in `tests/`; this library holds shared helpers for them.

#![deny(unsafe_code)] // test clients that pass fds and map shared memory opt in below

// in-process fuzz backends over raw buffers
#[allow(unsafe_code)]
pub mod fuzz;
pub mod guest;
pub mod net;
pub mod ns_admin;
// signals to the processes a test started
#[allow(unsafe_code)]
pub mod process;
// a raw vfio-user client: fd passing, mmap, truncation
#[allow(unsafe_code)]
pub mod hostile;
pub mod rpc;
// a vfio-user client driver with mmapped doorbells
#[allow(unsafe_code)]
pub mod nvme_client;
// memfd guest memory for test clients
#[allow(unsafe_code)]
pub mod shared_memory;
