//! The error type of the VM harness.

use std::path::PathBuf;
use std::process::ExitStatus;

/// Everything that can go wrong while building the harness or running a guest.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The harness cache could not be built (`build-harness.sh` failed).
    #[error("building the VM harness failed: {reason} (log: {})", log.display())]
    Build {
        /// What failed, e.g. the script's exit status.
        reason: String,
        /// The log holding the build script's full output.
        log: PathBuf,
    },
    /// An I/O operation of the harness itself failed.
    #[error("{context}: {source}")]
    Io {
        /// What the harness was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The guest was misconfigured (bad environment variable, clashing file names, ...).
    #[error("invalid guest configuration: {0}")]
    Config(String),
    /// A helper command (such as `qemu-img`) failed.
    #[error("{command} failed ({status}): {output}")]
    Command {
        /// The command line, for the message.
        command: String,
        /// Its exit status.
        status: ExitStatus,
        /// What it printed.
        output: String,
    },
    /// The guest did not finish within its timeout; QEMU was killed.
    #[error(
        "guest timed out after {secs} s (QEMU pid {qemu_pid} killed)\n--- console tail ---\n{console_tail}"
    )]
    Timeout {
        /// The timeout that elapsed, in seconds.
        secs: u64,
        /// The pid the QEMU child had (it no longer exists).
        qemu_pid: u32,
        /// The last lines of the console.
        console_tail: String,
    },
    /// QEMU exited without the guest printing its exit-status marker (QEMU failed to
    /// start, the guest kernel panicked, or the script powered the guest off itself).
    #[error(
        "QEMU exited ({qemu_status}) before the guest reported an exit status\n--- console tail ---\n{console_tail}"
    )]
    NoExitStatus {
        /// How QEMU exited.
        qemu_status: ExitStatus,
        /// The last lines of the console.
        console_tail: String,
    },
    /// The host's KVM cannot run the guest kernel ("KVM internal error"); QEMU was killed.
    #[error(
        "KVM internal error: this host's KVM cannot run the guest; rerun with VNVME_ACCEL=tcg\n--- console tail ---\n{console_tail}"
    )]
    KvmUnusable {
        /// The last lines of the console.
        console_tail: String,
    },
    /// The guest script exited with a non-zero status.
    #[error("guest script failed with exit status {status}\n--- console tail ---\n{console_tail}")]
    ScriptFailed {
        /// The script's exit status.
        status: i32,
        /// The last lines of the console.
        console_tail: String,
    },
}

impl VmError {
    /// Wraps an I/O error with what the harness was doing.
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| Self::Io { context, source }
    }
}
