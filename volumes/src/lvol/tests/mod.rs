//! Tests of the volume store: basics (`basics.rs`), and the crash-consistency harness
//! (`crash_disk.rs` simulates a volatile write cache that loses, reorders and tears
//! unflushed writes; `crash.rs` runs seeded random workloads over it).

mod basics;
mod bench;
mod concurrent;
mod crash;
mod crash_disk;
mod io;
