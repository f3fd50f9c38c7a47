//! End-to-end tests live in `tests/`; this library holds shared helpers for them.

pub mod guest;
pub mod nvme_client;
