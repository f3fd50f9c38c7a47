//! Plain file-descriptor calls: non-blocking mode, eventfd signalling, socket peeks.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

/// Put `fd` in non-blocking mode (fcntl(2) F_SETFL O_NONBLOCK), keeping its other flags.
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fcntl F_GETFL/F_SETFL with integer arguments on a descriptor borrowed for the
    // call; a bad descriptor only makes it fail.
    let r = unsafe {
        let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if fl < 0 {
            fl
        } else {
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK)
        }
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Add 1 to an eventfd's counter (eventfd(2)). On a non-blocking eventfd whose counter is
/// at its maximum this fails with `WouldBlock`: the event is pending anyway.
pub fn signal_eventfd(fd: BorrowedFd<'_>) -> io::Result<()> {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writing 8 bytes from a local array to a descriptor borrowed for the call.
    let n = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A new non-blocking, close-on-exec eventfd (eventfd(2)) with its counter at 0.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd with integer arguments; the descriptor it returns is new and ours.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created above and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reset a non-blocking eventfd's counter to 0; true when it was signalled.
pub fn drain_eventfd(fd: BorrowedFd<'_>) -> bool {
    let mut v = [0u8; 8];
    // SAFETY: reading 8 bytes into a local array from a descriptor borrowed for the call.
    let n = unsafe { libc::read(fd.as_raw_fd(), v.as_mut_ptr().cast(), v.len()) };
    n == 8
}

/// True when the peer of `s` has closed its end: a zero-length, non-blocking peek.
pub fn peer_closed(s: &UnixStream) -> bool {
    let mut b = [0u8; 1];
    // SAFETY: recv into a 1-byte local buffer on a socket borrowed for the call; MSG_PEEK
    // leaves any data in place.
    let n = unsafe {
        libc::recv(
            s.as_raw_fd(),
            b.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n == 0
}

/// Let `fd` be inherited across execve (clear FD_CLOEXEC), or stop it (`inherit` false).
/// Used by the supervisor for the one socket a worker it starts inherits.
pub fn set_inheritable(fd: BorrowedFd<'_>, inherit: bool) -> io::Result<()> {
    let flag = if inherit { 0 } else { libc::FD_CLOEXEC };
    // SAFETY: fcntl F_SETFD with an integer argument on a descriptor borrowed for the call.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, flag) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Take ownership of descriptor number `raw` inherited from the parent process (a worker's
/// link to its supervisor, named on its command line). It is checked to be open and made
/// close-on-exec again; a number that is not an open descriptor is refused.
pub fn take_inherited(raw: i32) -> io::Result<OwnedFd> {
    if raw < 3 {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // SAFETY: F_GETFD on a plain integer only reports whether it is an open descriptor.
    if unsafe { libc::fcntl(raw, libc::F_GETFD) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor is open, was inherited for this process to own (the parent
    // passed its number on purpose) and nothing else in the process has taken it.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    set_inheritable(std::os::fd::AsFd::as_fd(&fd), false)?;
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};

    #[test]
    fn eventfd_counts_and_a_full_one_does_not_block() {
        // SAFETY: eventfd with integer arguments; checked.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        set_nonblocking(fd.as_fd()).unwrap();
        signal_eventfd(fd.as_fd()).unwrap();
        signal_eventfd(fd.as_fd()).unwrap();
        let mut f = std::fs::File::from(fd);
        let mut v = [0u8; 8];
        f.read_exact(&mut v).unwrap();
        assert_eq!(u64::from_ne_bytes(v), 2);
        let max = (u64::MAX - 1).to_ne_bytes();
        std::io::Write::write_all(&mut f, &max).unwrap();
        let e = signal_eventfd(f.as_fd()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn peer_closed_only_after_close() {
        let (a, b) = UnixStream::pair().unwrap();
        assert!(!peer_closed(&a));
        drop(b);
        assert!(peer_closed(&a));
    }
}
