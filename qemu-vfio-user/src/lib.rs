//! vfio-user server for the emulated NVMe controller (`server/`), and the QEMU guest
//! harness used by tests and the demo (`vm/`).

pub mod server;
pub mod vm;
