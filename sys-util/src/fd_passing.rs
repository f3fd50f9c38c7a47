//! Descriptors passed one per message over a socket pair that keeps message boundaries
//! (`SOCK_SEQPACKET`, `SCM_RIGHTS`), without blocking either side.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// A connected, close-on-exec `AF_UNIX` `SOCK_SEQPACKET` pair (socketpair(2)): a message is
/// sent whole or not at all, and a closed peer reads as end of stream.
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: socketpair with integer arguments writes two new descriptors into a local
    // array of two.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created above and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Send a duplicate of `fd` over `sock` (one byte and the descriptor); never blocks: a
/// full socket fails with `WouldBlock`, a closed peer with `BrokenPipe` (no SIGPIPE).
pub fn send_fd(sock: BorrowedFd<'_>, fd: BorrowedFd<'_>) -> io::Result<()> {
    let byte = [1u8];
    let mut iov = libc::iovec {
        iov_base: byte.as_ptr().cast_mut().cast(),
        iov_len: 1,
    };
    // room for one descriptor's control message, aligned for cmsghdr
    let mut cbuf = [0u64; 4];
    // SAFETY: CMSG_SPACE is arithmetic on its argument.
    let space = unsafe { libc::CMSG_SPACE(size_of::<RawFd>() as u32) } as usize;
    debug_assert!(space <= size_of_val(&cbuf));
    // SAFETY: msghdr is plain data; zeroed is a valid initial state.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: filling the one control message of a buffer of CMSG_SPACE(one descriptor)
    // bytes that msg points at; the header and its data lie inside it.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&raw const msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(size_of::<RawFd>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<RawFd>(), fd.as_raw_fd());
    }
    // SAFETY: msg points at the live local buffers above; the flags make the call neither
    // block nor raise SIGPIPE.
    let n = unsafe {
        libc::sendmsg(
            sock.as_raw_fd(),
            &raw const msg,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// What [`recv_fd`] found.
#[derive(Debug)]
pub enum Passed {
    /// A message with a descriptor, now ours.
    Fd(OwnedFd),
    /// A message without one.
    Empty,
    /// Nothing to read now.
    Nothing,
    /// The peer closed its end.
    Closed,
}

/// Receive the next message of `sock` without blocking (its descriptor close-on-exec; the
/// kernel closes any beyond the first).
pub fn recv_fd(sock: BorrowedFd<'_>) -> io::Result<Passed> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut cbuf = [0u64; 4];
    // room for exactly one descriptor (CMSG_SPACE would leave room for two on 64-bit): the
    // kernel closes any beyond it
    // SAFETY: CMSG_LEN is arithmetic on its argument.
    let room = unsafe { libc::CMSG_LEN(size_of::<RawFd>() as u32) } as usize;
    // SAFETY: msghdr is plain data; zeroed is a valid initial state.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = room as _;
    let flags = libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC;
    // SAFETY: msg points at the live local buffers above, sized as it says.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &raw mut msg, flags) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock => Ok(Passed::Nothing),
            _ => Err(e),
        };
    }
    // SAFETY: walking the control messages the kernel wrote into cbuf, as msg describes.
    let c = unsafe { libc::CMSG_FIRSTHDR(&raw const msg) };
    if !c.is_null() {
        // SAFETY: c points at a control message header inside cbuf (CMSG_FIRSTHDR checked
        // its length); an SCM_RIGHTS one carries at least one descriptor, now ours.
        unsafe {
            if (*c).cmsg_level == libc::SOL_SOCKET
                && (*c).cmsg_type == libc::SCM_RIGHTS
                && (*c).cmsg_len as usize >= libc::CMSG_LEN(size_of::<RawFd>() as u32) as usize
            {
                let fd = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<RawFd>());
                return Ok(Passed::Fd(OwnedFd::from_raw_fd(fd)));
            }
        }
    }
    Ok(if n == 0 {
        Passed::Closed
    } else {
        Passed::Empty
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;

    /// A descriptor sent is the same open file on the other side; a closed sender reads as
    /// closed; an empty socket as nothing.
    #[test]
    fn a_descriptor_crosses_and_a_closed_peer_shows() {
        let (a, b) = seqpacket_pair().unwrap();
        let (mut x, y) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(matches!(recv_fd(b.as_fd()).unwrap(), Passed::Nothing));
        send_fd(a.as_fd(), y.as_fd()).unwrap();
        drop(y);
        let Passed::Fd(got) = recv_fd(b.as_fd()).unwrap() else {
            panic!("no descriptor");
        };
        let mut got = std::os::unix::net::UnixStream::from(got);
        x.write_all(b"hi").unwrap();
        let mut buf = [0u8; 2];
        got.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
        drop(a);
        assert!(matches!(recv_fd(b.as_fd()).unwrap(), Passed::Closed));
    }
}
