//! `poll(2)` with a `Duration` and EINTR folded into "nothing ready".

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

pub use libc::pollfd as PollFd;
pub use libc::{POLLERR, POLLHUP, POLLIN, POLLOUT};

/// A [`PollFd`] for `fd` waiting for `events` (`POLLIN`, `POLLOUT`).
pub fn entry(fd: &impl AsRawFd, events: i16) -> PollFd {
    PollFd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    }
}

/// Wait up to `timeout` (rounded up to whole milliseconds, at most `i32::MAX`) for any of
/// `fds`; returns how many have events (`revents` set). An interrupted wait returns 0.
pub fn poll(fds: &mut [PollFd], timeout: Duration) -> io::Result<usize> {
    let ms = i32::try_from(timeout.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
    // SAFETY: `fds` is a valid, exclusively borrowed array of pollfd for the whole call; an
    // fd that is not open only yields POLLNVAL.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    ready_count(r)
}

/// [`poll`] with a timeout to the microsecond (ppoll(2)), for a reactor's short naps.
pub fn poll_precise(fds: &mut [PollFd], timeout: Duration) -> io::Result<usize> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(i32::MAX as u64) as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: `fds` is a valid, exclusively borrowed array of pollfd and `ts` a local
    // timespec, both for the whole call; no signal mask is passed.
    let r = unsafe {
        libc::ppoll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            std::ptr::from_ref(&ts),
            std::ptr::null(),
        )
    };
    ready_count(r)
}

/// A poll result: how many descriptors are ready; an interrupted wait counts as none.
fn ready_count(r: libc::c_int) -> io::Result<usize> {
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(0)
        } else {
            Err(e)
        };
    }
    Ok(r as usize)
}

/// Wait up to `timeout` for `fd` to have one of `events`; true when it has (or hung up).
pub fn wait(fd: impl AsFd, events: i16, timeout: Duration) -> io::Result<bool> {
    let mut p = [entry(&fd.as_fd(), events)];
    Ok(poll(&mut p, timeout)? > 0)
}

/// [`wait`] for input.
pub fn wait_readable(fd: impl AsFd, timeout: Duration) -> io::Result<bool> {
    wait(fd, POLLIN, timeout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    #[test]
    fn readable_only_once_written() {
        let (mut a, b) = UnixStream::pair().unwrap();
        assert!(!wait_readable(&b, Duration::from_millis(1)).unwrap());
        a.write_all(b"x").unwrap();
        assert!(wait_readable(&b, Duration::from_secs(1)).unwrap());
        assert!(
            wait(&a, POLLOUT, Duration::ZERO).unwrap(),
            "a socket with room is writable"
        );
    }

    #[test]
    fn precise_poll_times_out_short_and_sees_an_eventfd() {
        let fd = crate::fd::eventfd().unwrap();
        let mut p = [entry(&fd, POLLIN)];
        let t = std::time::Instant::now();
        assert_eq!(poll_precise(&mut p, Duration::from_micros(300)).unwrap(), 0);
        assert!(t.elapsed() < Duration::from_millis(500));
        crate::fd::signal_eventfd(fd.as_fd()).unwrap();
        assert_eq!(poll_precise(&mut p, Duration::from_secs(5)).unwrap(), 1);
        assert!(crate::fd::drain_eventfd(fd.as_fd()));
        assert!(
            !crate::fd::drain_eventfd(fd.as_fd()),
            "drained: the counter is 0"
        );
    }
}
