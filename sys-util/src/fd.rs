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
