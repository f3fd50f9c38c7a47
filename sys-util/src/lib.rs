//! What the daemon asks of the OS outside the data path's guest memory (that is
//! `device_model::memory`, on vm-memory): memory it shares with a client or a device
//! (a sealed memfd, mapped once), private anonymous memory, `poll(2)`, plain descriptor
//! calls, process settings, and a lock for per-request state ([`YieldLock`]).
//!
//! Everything here is built on `memmap2` and `libc`; callers stay safe Rust except where
//! they hand a raw pointer of a [`SharedMemory`] to hardware or read it with atomics.

pub mod anonymous;
pub mod clock;
pub mod fd;
pub mod fd_passing;
pub mod kept_ram;
pub mod poll;
pub mod process;
pub mod shared_memory;
pub mod yield_hint;
pub mod yield_lock;

pub use anonymous::{ZERO_CHUNK, zeroes};
pub use shared_memory::{SharedMemory, SharedMemoryOptions, Window, sealed_memfd};
pub use yield_lock::{YieldGuard, YieldLock};
