//! Subcommands of the `vnvme` binary.

pub mod demo;
pub mod discover;
pub mod guest;
pub mod identify;
pub mod lvs_check;
pub mod perf;
pub mod perf_many;
pub mod rpc;
pub mod serve;

/// `print!` to stdout that ends the process quietly when stdout is a closed pipe
/// (`vnvme identify --json ... | head`), instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = write!(std::io::stdout(), $($arg)*) {
            $crate::cli::stdout_failed(&e);
        }
    }};
}

/// [`out!`] with a newline.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($arg)*) {
            $crate::cli::stdout_failed(&e);
        }
    }};
}

pub(crate) use {out, outln};

/// Writing to stdout failed: a reader that went away (EPIPE) ends the command quietly, any
/// other error with a message.
pub fn stdout_failed(e: &std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("vnvme: error: writing to stdout: {e}");
    std::process::exit(1);
}
