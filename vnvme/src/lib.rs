//! The vnvme daemon as a library: configuration (TOML file or `--ns` flags), namespace
//! backend specs, and [`daemon::Daemon`], which runs one vfio-user server and one reactor
//! per controller; and the host-side tools over `host-driver`: [`target`] names a
//! controller, [`perf`] measures it. The `vnvme` binary is a thin CLI over this.

#![deny(unsafe_code)] // unsafe only in the modules marked `allow(unsafe_code)` below

pub mod arrays;
pub mod backend_spec;
pub mod config;
pub mod daemon;
pub mod device_address;
pub mod limits;
pub mod lvstores;
pub mod metrics;
pub mod namespace_pool;
pub mod perf;
pub mod pool_spec;
pub mod rpc;
pub mod supervisor;
