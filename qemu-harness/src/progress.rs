//! User-facing progress output of the VM harness.
//!
//! Booting a guest or building the harness takes seconds to minutes; a person running the
//! tests wants to see that something is happening even without a logger configured. This
//! module is the only place in the library that writes to stderr directly.

use std::io::Write;

/// Prints one user-facing progress line (`vnvme vm: ...`) to stderr.
pub(crate) fn progress(message: std::fmt::Arguments<'_>) {
    log::debug!("{message}");
    let _ = writeln!(std::io::stderr().lock(), "vnvme vm: {message}");
}

/// Passes one line through to stderr unchanged (guest console echo, build script progress).
pub(crate) fn passthrough(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}
