//! Tests of the volume store: basics (`basics.rs`), commits that wait for the base without
//! holding up the data path (`commit.rs`), partial granules copied up the same way (`fill.rs`), requests completing out of order
//! (`concurrent.rs`), and the crash-consistency harness (`crash_disk.rs` simulates a
//! volatile write cache that loses, reorders and tears unflushed writes; `crash.rs` runs
//! seeded random workloads over it one request at a time, `crash_qd.rs` with up to 16
//! writes in flight); `bench.rs` holds the ignored benchmarks.

mod basics;
mod bench;
mod commit;
mod concurrent;
mod crash;
pub(crate) mod crash_disk;
mod crash_qd;
mod fill;
mod gate;
pub(crate) mod io;
