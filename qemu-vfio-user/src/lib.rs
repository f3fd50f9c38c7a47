//! vfio-user server for the emulated NVMe controller (`server/`), and the QEMU guest
//! harness used by tests and the demo (`vm/`).

#![deny(unsafe_code)] // unsafe only in the modules marked `allow(unsafe_code)` below

pub mod server;
pub mod vm;
