//! Subcommands of the `vnvme` binary.

pub mod demo;
pub mod discover;
pub mod guest;
pub mod identify;
pub mod perf;
pub mod perf_many;
pub mod rpc;
pub mod serve;
