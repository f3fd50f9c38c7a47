//! Signals to processes the tests started, and waiting until a stop has landed.

use std::time::{Duration, Instant};

/// Send `sig` to process `pid` (a child of the test's).
pub fn signal(pid: u32, sig: libc::c_int) {
    let p = pid as libc::pid_t;
    // SAFETY: kill(2) with a pid and a signal number: no memory is involved.
    assert_eq!(unsafe { libc::kill(p, sig) }, 0, "kill({pid}, {sig})");
}

/// States of the process's threads (the field after the command name in their stat).
pub fn thread_states(pid: u32) -> Vec<char> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("stat")).ok())
        .filter_map(|stat| stat.rsplit_once(')')?.1.trim_start().chars().next())
        .collect()
}

/// SIGSTOP, and wait (at most 5 s) until every thread of the process has stopped: the
/// signal lands asynchronously, and a process that answers in microseconds would otherwise
/// still serve what the test sends next.
pub fn freeze(pid: u32) {
    signal(pid, libc::SIGSTOP);
    let t = Instant::now();
    while thread_states(pid).iter().any(|&s| s != 'T') {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "process {pid} not stopped: {:?}",
            thread_states(pid)
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}
