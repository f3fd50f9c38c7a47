//! Reading and writing vfio-user messages on a Unix stream socket, with file descriptors
//! passed as SCM_RIGHTS ancillary data.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use zerocopy::FromBytes;

use super::protocol::{HEADER_SIZE, Header, MAX_MSG_FDS};

/// What `recv_header` got.
pub enum Incoming {
    Message { header: Header, fds: Vec<OwnedFd> },
    Closed,
}

/// How long a client may take to send the rest of a message it has started, or to take a
/// reply off its socket: a client that stops mid-message loses its connection instead of
/// holding the server thread (and the daemon's shutdown) forever.
pub const MESSAGE_TIMEOUT: Duration = Duration::from_secs(5);
/// Granularity of the stop-flag checks while a message is incomplete.
pub const READ_SLICE: Duration = Duration::from_millis(200);

/// Bounds one message's reads: the stop flag and [`MESSAGE_TIMEOUT`] from its first byte.
pub struct Deadline<'a> {
    stop: &'a AtomicBool,
    until: Instant,
}

impl<'a> Deadline<'a> {
    /// A deadline starting now. The socket must have a read timeout (`READ_SLICE`) so that
    /// a silent client returns `WouldBlock` instead of blocking.
    pub fn new(stop: &'a AtomicBool) -> Self {
        Self {
            stop,
            until: Instant::now() + MESSAGE_TIMEOUT,
        }
    }

    /// After a read timed out: go on waiting, or give up with the reason.
    fn check(&self) -> io::Result<()> {
        if self.stop.load(Ordering::Relaxed) {
            return Err(io::Error::new(
                io::ErrorKind::Interrupted,
                "server stopping",
            ));
        }
        if Instant::now() >= self.until {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "client sent part of a message and then nothing for {} s",
                    MESSAGE_TIMEOUT.as_secs()
                ),
            ));
        }
        Ok(())
    }
}

fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    ) && e.raw_os_error().is_some()
}

/// Read one header (16 bytes) and any fds that came with it. Fds arrive with the first byte
/// of a message; more than we allow are closed and reported as an error by the caller
/// through the fd count (the ancillary buffer holds MAX_MSG_FDS + 1).
pub fn recv_header(sock: &UnixStream, deadline: &Deadline<'_>) -> io::Result<(Incoming, bool)> {
    let mut buf = [0u8; HEADER_SIZE];
    let mut fds = Vec::new();
    let mut truncated = false;
    let mut got = 0;
    while got < HEADER_SIZE {
        let (n, mut f, trunc) = match recvmsg_fds(sock.as_raw_fd(), &mut buf[got..]) {
            Ok(r) => r,
            Err(e) if timed_out(&e) => {
                deadline.check()?;
                continue;
            }
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Ok((Incoming::Closed, false));
        }
        got += n;
        truncated |= trunc;
        fds.append(&mut f);
    }
    let header =
        Header::read_from_bytes(&buf).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    Ok((Incoming::Message { header, fds }, truncated))
}

/// Read some bytes into `buf` within the deadline; 0 means the peer closed.
fn read_some(mut sock: &UnixStream, buf: &mut [u8], deadline: &Deadline<'_>) -> io::Result<usize> {
    loop {
        match sock.read(buf) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => return Ok(n),
            Err(e) if timed_out(&e) => deadline.check()?,
            Err(e) => return Err(e),
        }
    }
}

/// Read exactly `len` payload bytes (the header's size is checked against the protocol's
/// maximum before this allocates).
pub fn recv_body(sock: &UnixStream, len: usize, deadline: &Deadline<'_>) -> io::Result<Vec<u8>> {
    let mut body = vec![0u8; len];
    let mut got = 0;
    while got < len {
        got += read_some(sock, &mut body[got..], deadline)?;
    }
    Ok(body)
}

/// Read and discard `len` bytes (a refused message's payload), keeping the stream in step.
pub fn discard(sock: &UnixStream, mut len: usize, deadline: &Deadline<'_>) -> io::Result<()> {
    let mut scratch = [0u8; 8192];
    while len > 0 {
        len -= read_some(sock, &mut scratch[..len.min(8192)], deadline)?;
    }
    Ok(())
}

fn cmsg_space(fds: usize) -> usize {
    // SAFETY: CMSG_SPACE is a pure computation.
    unsafe { libc::CMSG_SPACE((fds * size_of::<RawFd>()) as u32) as usize }
}

// CMSG_DATA is cast to *RawFd but only used with read/write_unaligned.
#[allow(clippy::cast_ptr_alignment)]
fn recvmsg_fds(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>, bool)> {
    let mut cbuf = vec![0u8; cmsg_space(MAX_MSG_FDS + 1)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; zeroed is a valid initial state.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = cbuf.len();
    let n = loop {
        // SAFETY: msg points at our iovec and control buffer, both alive for the call.
        let n = unsafe { libc::recvmsg(fd, &raw mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: walking the control buffer the kernel filled, with the libc CMSG macros.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&raw const msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                let count =
                    ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / size_of::<RawFd>();
                for i in 0..count {
                    let raw = std::ptr::read_unaligned(data.add(i));
                    fds.push(OwnedFd::from_raw_fd(raw));
                }
            }
            c = libc::CMSG_NXTHDR(&raw const msg, c);
        }
    }
    let truncated = msg.msg_flags & libc::MSG_CTRUNC != 0;
    Ok((n, fds, truncated))
}

/// Send `data` (a whole message) with optional fds.
#[allow(clippy::cast_ptr_alignment)] // CMSG_DATA written with write_unaligned only
pub fn send(sock: &UnixStream, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let mut sent = 0;
    let mut first = true;
    while sent < data.len() {
        let mut iov = libc::iovec {
            iov_base: data[sent..].as_ptr().cast_mut().cast(),
            iov_len: data.len() - sent,
        };
        // SAFETY: msghdr is plain data; zeroed is a valid initial state.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        let mut cbuf = vec![0u8; cmsg_space(fds.len().max(1))];
        if first && !fds.is_empty() {
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = cmsg_space(fds.len());
            // SAFETY: filling the one cmsg header of a buffer sized by CMSG_SPACE for fds.len().
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&raw const msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN((fds.len() * size_of::<RawFd>()) as u32) as _;
                let p = libc::CMSG_DATA(c).cast::<RawFd>();
                for (i, f) in fds.iter().enumerate() {
                    std::ptr::write_unaligned(p.add(i), f.as_raw_fd());
                }
            }
        }
        // SAFETY: msg points at live buffers; MSG_NOSIGNAL avoids SIGPIPE on a closed peer.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &raw const msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        sent += n as usize;
        first = false;
    }
    Ok(())
}
