//! End-to-end tests live in `tests/`; this library holds shared helpers for them.

pub mod fuzz;
pub mod guest;
pub mod hostile;
pub mod nvme_client;
pub mod shared_memory;
