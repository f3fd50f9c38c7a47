//! vfio-user server for the emulated NVMe controller. (The QEMU guest harness the tests
//! and the demo use is the `qemu-harness` crate.)

#![deny(unsafe_code)] // unsafe only in the modules marked `allow(unsafe_code)` below

pub mod server;
