//! A non-blocking TCP connection carrying NVMe/TCP PDUs: a receive buffer that frames PDUs
//! (the common header is checked before the rest is waited for) and a send buffer that is
//! written as far as the socket takes it. Nothing here blocks except [`PduStream::wait`].

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::Instant;
use sys_util::poll;

use nvme_spec::tcp::TERM_REQ_MAX_DATA;

use crate::pdu::{self, Direction, Negotiated, Pdu, PduError};

/// Why a connection is unusable.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("connection closed by the peer")]
    Closed,
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// The peer sent a PDU that breaks the protocol; a termination request was queued.
    #[error(transparent)]
    Protocol(PduError),
    /// The peer terminated the connection with a termination request.
    #[error("peer terminated the connection (FES {fes:#x}, FEI {fei})")]
    Terminated { fes: u16, fei: u32 },
    #[error("timed out after {0} ms")]
    Timeout(u64),
    #[error("{0}")]
    Unexpected(&'static str),
}

/// Received bytes, framed into PDUs.
#[derive(Debug)]
pub struct RxBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    dir: Direction,
}

impl RxBuf {
    /// The next complete PDU, if one has arrived. A fatal error leaves the buffer as it is
    /// (the connection is finished); a data digest error consumes the PDU.
    /// Bytes received and not yet consumed as PDUs.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    pub fn next_pdu(&mut self, neg: &Negotiated) -> Result<Option<Pdu<'_>>, PduError> {
        let avail = &self.buf[self.start..self.end];
        let Some(first) = avail.first_chunk::<8>() else {
            return Ok(None);
        };
        let ch = pdu::check_common(first, self.dir, neg)?;
        let plen = ch.plen.get() as usize;
        if plen > self.buf.len() {
            return Err(PduError::Fatal {
                fes: nvme_spec::tcp::fes::DATA_OUT_OF_RANGE,
                fei: 4,
                what: "PDU larger than the receive buffer",
            });
        }
        if avail.len() < plen {
            return Ok(None);
        }
        let at = self.start;
        let r = pdu::decode(&self.buf[at..at + plen], self.dir, neg);
        // a fatal error leaves the bad PDU first in the buffer, for the termination request
        if !matches!(r, Err(PduError::Fatal { .. })) {
            self.start = at + plen;
        }
        r.map(Some)
    }

    /// The start of what is buffered (for echoing a bad header in a termination request).
    pub fn head(&self) -> &[u8] {
        let end = self.end.min(self.start + TERM_REQ_MAX_DATA);
        &self.buf[self.start..end]
    }

    /// Read what the socket has. Returns the bytes read (0: nothing now).
    fn fill(&mut self, sock: &mut TcpStream) -> Result<usize, StreamError> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let mut total = 0;
        while self.end < self.buf.len() {
            match sock.read(&mut self.buf[self.end..]) {
                Ok(0) => return Err(StreamError::Closed),
                Ok(n) => {
                    self.end += n;
                    total += n;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(total)
    }
}

/// Sent bytes kept at the front of the send buffer before it is compacted.
const COMPACT_AT: usize = 1 << 20;

/// Bytes queued for sending.
#[derive(Debug, Default)]
pub struct TxBuf {
    buf: Vec<u8>,
    sent: usize,
}

impl TxBuf {
    /// Where to append the next PDU (see [`pdu::encode_header`]).
    pub fn out(&mut self) -> &mut Vec<u8> {
        if self.sent == self.buf.len() {
            self.buf.clear();
            self.sent = 0;
        } else if self.sent >= COMPACT_AT {
            // keep only what is unsent, so a socket that never drains fully does not
            // make the buffer grow by everything ever sent
            self.buf.drain(..self.sent);
            self.sent = 0;
        }
        &mut self.buf
    }

    /// Append `p`.
    pub fn push(&mut self, p: &Pdu<'_>, neg: &Negotiated) {
        pdu::encode_append(p, neg, self.out());
    }

    /// Bytes not yet written.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.sent
    }

    fn flush(&mut self, sock: &mut TcpStream) -> Result<(), StreamError> {
        while self.sent < self.buf.len() {
            match sock.write(&self.buf[self.sent..]) {
                Ok(0) => return Err(StreamError::Closed),
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

/// One NVMe/TCP connection.
#[derive(Debug)]
pub struct PduStream {
    sock: TcpStream,
    pub rx: RxBuf,
    pub tx: TxBuf,
    /// Parameters agreed at connection initialization.
    pub neg: Negotiated,
    /// The write side was ended by [`hang_up`](Self::hang_up).
    write_ended: bool,
}

impl PduStream {
    /// Wrap a connected socket (made non-blocking, Nagle off). `dir` is the direction of the
    /// PDUs this side receives; `max_data` is the most data one received PDU may carry (the
    /// buffer adds room for the header, padding and digests).
    pub fn new(sock: TcpStream, dir: Direction, max_data: usize) -> std::io::Result<Self> {
        let max_pdu = max_data + 512;
        sock.set_nonblocking(true)?;
        sock.set_nodelay(true)?;
        Ok(Self {
            sock,
            rx: RxBuf {
                buf: vec![0; max_pdu.max(4096)],
                start: 0,
                end: 0,
                dir,
            },
            tx: TxBuf::default(),
            neg: Negotiated::default(),
            write_ended: false,
        })
    }

    /// Write queued bytes and read what has arrived; never blocks. Returns the bytes read.
    pub fn pump(&mut self) -> Result<usize, StreamError> {
        self.tx.flush(&mut self.sock)?;
        self.rx.fill(&mut self.sock)
    }

    /// Send what is queued now (no read).
    pub fn flush(&mut self) -> Result<(), StreamError> {
        self.tx.flush(&mut self.sock)
    }

    /// The poll(2) events that mean work for this stream: input, and output while bytes
    /// are queued.
    pub fn events(&self) -> i16 {
        if self.tx.pending() > 0 {
            poll::POLLIN | poll::POLLOUT
        } else {
            poll::POLLIN
        }
    }

    /// Block until the socket is readable (or writable while bytes are queued) or
    /// `deadline` passes; then pump.
    pub fn wait(&mut self, deadline: Instant) -> Result<usize, StreamError> {
        let now = Instant::now();
        if now >= deadline {
            return Err(StreamError::Timeout(0));
        }
        poll::wait(&self.sock, self.events(), deadline - now)?;
        self.pump()
    }

    /// Queue a termination request for a fatal error (echoing the offending header) and
    /// try to send it; the connection is finished afterwards. `to_host` picks C2HTermReq.
    pub fn terminate(&mut self, fes: u16, fei: u32, to_host: bool) {
        let mut term = Vec::new();
        pdu::encode_term_req(fes, fei, self.rx.head(), to_host, &mut term);
        self.tx.out().extend_from_slice(&term);
        let _ = self.tx.flush(&mut self.sock);
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }

    /// The peer's address, for logs.
    pub fn peer(&self) -> String {
        self.sock
            .peer_addr()
            .map_or_else(|_| "?".into(), |a| a.to_string())
    }

    /// One step of a graceful close; call it again until it answers `Ok(true)`, the peer
    /// having closed its end too. Sends what is queued, then ends the write side once (the
    /// peer reads end of stream), then reads and drops whatever the peer still sends. A
    /// socket closed with bytes unread, or receiving after its close, answers with a reset
    /// instead, and a peer's next send then fails with EPIPE (Linux's nvme-tcp host sends
    /// from the task submitting the I/O, without MSG_NOSIGNAL: that task gets SIGPIPE).
    pub fn hang_up(&mut self) -> Result<bool, StreamError> {
        if !self.write_ended {
            self.tx.flush(&mut self.sock)?;
            if self.tx.pending() > 0 {
                return Ok(false);
            }
            self.sock.shutdown(std::net::Shutdown::Write)?;
            self.write_ended = true;
        }
        self.rx.start = 0;
        self.rx.end = 0;
        Ok(drain_step(&mut self.sock, &mut self.rx.buf)?)
    }

    /// Close both directions now (in-flight data is dropped).
    pub fn shutdown(&self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }

    /// Raw fd for callers that poll several streams.
    pub fn fd(&self) -> std::os::fd::RawFd {
        self.sock.as_raw_fd()
    }
}

/// One step of draining non-blocking socket `sock` whose write side is ended: read what the
/// peer still sends into `sink` and drop it, at most 16 reads (a peer that keeps sending
/// holds nobody up). `Ok(true)` once the peer has closed its end.
pub fn drain_step(sock: &mut TcpStream, sink: &mut [u8]) -> std::io::Result<bool> {
    for _ in 0..16 {
        match sock.read(sink) {
            Ok(0) => return Ok(true),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(false)
}

impl std::os::fd::AsFd for PduStream {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.sock)
    }
}

impl Drop for PduStream {
    /// The connection ends here even when another process holds a duplicate of the socket
    /// (a supervisor keeping it for a graceful close should this process die).
    fn drop(&mut self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }
}
