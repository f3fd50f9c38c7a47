//! Process- and thread-wide settings: open-file limit, timer slack, termination signals,
//! the CPU's time-stamp counter.

use std::sync::atomic::{AtomicBool, Ordering};

/// Set the soft open-file limit (RLIMIT_NOFILE) to the hard one; returns the limit now in
/// force (1024 when it cannot be read).
pub fn raise_open_files_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with pointers to local rlimit structs.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const want) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    lim.rlim_cur
}

/// Set the calling thread's timer slack (prctl(2) PR_SET_TIMERSLACK) to `ns`: how late the
/// kernel may wake it from a sleep.
pub fn set_timer_slack(ns: u64) {
    // SAFETY: prctl(PR_SET_TIMERSLACK) on the calling thread with plain integer arguments.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, ns, 0u64, 0u64, 0u64) };
}

static TERMINATE: AtomicBool = AtomicBool::new(false);

extern "C" fn on_terminate(_: libc::c_int) {
    TERMINATE.store(true, Ordering::Relaxed);
}

/// Catch SIGINT and SIGTERM from now on: they only set the flag [`terminate_requested`]
/// reads (the handler stores to an atomic, which is async-signal-safe).
pub fn catch_termination_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: installing a handler that only stores to a static atomic.
        unsafe { libc::signal(sig, on_terminate as *const () as libc::sighandler_t) };
    }
}

/// True once SIGINT or SIGTERM arrived after [`catch_termination_signals`].
pub fn terminate_requested() -> bool {
    TERMINATE.load(Ordering::Relaxed)
}

static HANGUP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_hangup(_: libc::c_int) {
    HANGUP.store(true, Ordering::Relaxed);
}

/// Catch SIGHUP from now on (the supervisor's "upgrade the worker"): it only sets the flag
/// [`take_hangup`] reads.
pub fn catch_hangup() {
    // SAFETY: installing a handler that only stores to a static atomic.
    unsafe { libc::signal(libc::SIGHUP, on_hangup as *const () as libc::sighandler_t) };
}

/// True once per SIGHUP that arrived after [`catch_hangup`] (the flag is cleared).
pub fn take_hangup() -> bool {
    HANGUP.swap(false, Ordering::Relaxed)
}

/// Ask process `pid` to terminate (SIGTERM): a supervisor stopping its worker.
pub fn terminate(pid: u32) -> std::io::Result<()> {
    let pid =
        i32::try_from(pid).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: kill(2) with a plain pid and signal number; it only fails or delivers.
    if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The CPU's time-stamp counter (RDTSC) on x86_64, `None` elsewhere.
#[inline]
pub fn read_tsc() -> Option<u64> {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: RDTSC has no preconditions on x86_64.
        Some(unsafe { core::arch::x86_64::_rdtsc() })
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_and_tsc() {
        assert!(raise_open_files_limit() >= 1024);
        set_timer_slack(1000);
        if cfg!(target_arch = "x86_64") {
            let a = read_tsc().unwrap();
            assert!(read_tsc().unwrap() >= a);
        }
        assert!(!terminate_requested());
    }
}
