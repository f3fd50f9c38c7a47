//! The Prometheus endpoint (`vnvme serve --metrics ADDR:PORT`): `GET /metrics` over HTTP/1.x
//! on a thread of its own, so a slow or hostile peer never holds the management socket or a
//! reactor.
//!
//! Every peer is treated as hostile: one connection is served at a time (others wait in the
//! listen backlog), the request head must arrive whole within [`REQUEST_DEADLINE`] and fit in
//! [`MAX_REQUEST`] bytes, the answer must be taken within [`WRITE_TIMEOUT`]; anything but
//! `GET /metrics` is answered 400, 404, 405 or 431 and the connection closed (each answer
//! closes it; what the peer still sends is read and dropped for at most a second and 64 KiB,
//! so the close does not reset the answer away). A panic while serving a connection is
//! caught and the connection dropped. A peer can at worst delay other scrapers by a few
//! seconds per connection: bind the endpoint to a trusted network.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::Source;

/// Longest request head (request line and headers) accepted.
pub const MAX_REQUEST: usize = 8 << 10;
/// The request head must be complete this long after the connection was accepted.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// A peer that does not take the answer for this long is dropped.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// The controllers to export, replaced by the daemon's main thread when they change.
#[derive(Debug, Default)]
pub struct Registry {
    sources: Mutex<Arc<Vec<Source>>>,
}

impl Registry {
    /// Export `sources` from now on.
    pub fn set(&self, sources: Vec<Source>) {
        *self.sources.lock().unwrap_or_else(PoisonError::into_inner) = Arc::new(sources);
    }

    /// The controllers exported now.
    pub fn get(&self) -> Arc<Vec<Source>> {
        Arc::clone(&self.sources.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// The running endpoint; dropping it stops its thread.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    registry: Arc<Registry>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Listen on `addr` (port 0: any free port, see [`MetricsServer::local_addr`]).
    pub fn start(addr: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let registry = Arc::new(Registry::default());
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (registry, stop) = (Arc::clone(&registry), Arc::clone(&stop));
            std::thread::Builder::new()
                .name("metrics".into())
                .spawn(move || run(&listener, &registry, &stop))?
        };
        Ok(Self {
            addr,
            registry,
            stop,
            thread: Some(thread),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where the daemon sets the controllers to export.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(listener: &TcpListener, registry: &Registry, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        if !sys_util::poll::wait_readable(listener, Duration::from_millis(100)).unwrap_or(false) {
            continue;
        }
        while let Ok((stream, peer)) = listener.accept() {
            let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                serve(stream, registry, stop)
            }));
            match served {
                Ok(Ok(())) => {}
                Ok(Err(e)) => log::debug!("metrics: {peer}: {e}"),
                Err(_) => device_model::error_limited!("metrics: serving {peer} panicked; dropped"),
            }
            if stop.load(Ordering::Relaxed) {
                return;
            }
        }
    }
}

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
enum Asked {
    Metrics,
    Malformed,
    NotFound,
    MethodNotAllowed,
    TooLarge,
}

/// Read a request head: up to the blank line, at most [`MAX_REQUEST`] bytes, before the
/// deadline. `None`: the peer went away or was too slow (closed without an answer).
fn read_head(stream: &mut TcpStream, stop: &AtomicBool) -> std::io::Result<Option<Asked>> {
    let deadline = Instant::now() + REQUEST_DEADLINE;
    let mut buf = vec![0u8; MAX_REQUEST];
    let mut len = 0;
    loop {
        if let Some(end) = head_end(&buf[..len]) {
            return Ok(Some(parse(&buf[..end])));
        }
        if len == MAX_REQUEST {
            return Ok(Some(Asked::TooLarge));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stop.load(Ordering::Relaxed) {
            return Ok(None);
        }
        // short slices: shutdown is noticed within a second
        stream.set_read_timeout(Some(left.min(Duration::from_secs(1))))?;
        match stream.read(&mut buf[len..]) {
            Ok(0) => return Ok(None),
            Ok(n) => len += n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
}

/// Length of the head in `buf` when it is complete (through "\r\n\r\n" or "\n\n").
fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// What the request line of `head` asks for.
fn parse(head: &[u8]) -> Asked {
    let line_end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
    let Ok(line) = std::str::from_utf8(&head[..line_end]) else {
        return Asked::Malformed;
    };
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Asked::Malformed;
    };
    if !version.starts_with("HTTP/1.") || method.is_empty() || !target.starts_with('/') {
        return Asked::Malformed;
    }
    let path = target.split('?').next().unwrap_or(target);
    if path != "/metrics" {
        return Asked::NotFound;
    }
    if method != "GET" {
        return Asked::MethodNotAllowed;
    }
    Asked::Metrics
}

fn serve(mut stream: TcpStream, registry: &Registry, stop: &AtomicBool) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let Some(req) = read_head(&mut stream, stop)? else {
        return Ok(());
    };
    let (status, extra, body) = match req {
        Asked::Metrics => (
            "200 OK",
            "Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n",
            super::prometheus(&registry.get()),
        ),
        Asked::NotFound => ("404 Not Found", "", "only /metrics is served\n".into()),
        Asked::MethodNotAllowed => (
            "405 Method Not Allowed",
            "Allow: GET\r\n",
            "only GET is served\n".into(),
        ),
        Asked::Malformed => ("400 Bad Request", "", "not an HTTP/1 request\n".into()),
        Asked::TooLarge => (
            "431 Request Header Fields Too Large",
            "",
            format!("the request head is limited to {MAX_REQUEST} bytes\n"),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    stream.flush()?;
    // closing with the peer's bytes unread sends a reset, which can destroy the answer
    // before the peer reads it: end our side, then take what it still sends, for a bounded
    // time and amount
    let _ = stream.shutdown(std::net::Shutdown::Write);
    drain(&mut stream);
    Ok(())
}

/// Read and drop what the peer still sends, until it closes, [`DRAIN_LIMIT`] bytes or
/// [`DRAIN_TIME`].
fn drain(stream: &mut TcpStream) {
    let until = Instant::now() + DRAIN_TIME;
    let mut buf = [0u8; 4096];
    let mut total = 0;
    while total < DRAIN_LIMIT {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => total += n,
        }
    }
}

/// What is read of a peer after the answer, at most.
const DRAIN_LIMIT: usize = 64 << 10;
const DRAIN_TIME: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines() {
        assert_eq!(
            parse(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Asked::Metrics
        );
        assert_eq!(parse(b"GET /metrics?x=1 HTTP/1.0\n\n"), Asked::Metrics);
        assert_eq!(
            parse(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Asked::MethodNotAllowed
        );
        assert_eq!(
            parse(b"HEAD /metrics HTTP/1.1\r\n\r\n"),
            Asked::MethodNotAllowed
        );
        assert_eq!(parse(b"GET / HTTP/1.1\r\n\r\n"), Asked::NotFound);
        assert_eq!(parse(b"GET /metricsx HTTP/1.1\r\n\r\n"), Asked::NotFound);
        assert_eq!(parse(b"GET /metrics\r\n\r\n"), Asked::Malformed);
        assert_eq!(parse(b"GET /metrics SPDY/3\r\n\r\n"), Asked::Malformed);
        assert_eq!(
            parse(b"\xff\xfe /metrics HTTP/1.1\r\n\r\n"),
            Asked::Malformed
        );
        assert_eq!(parse(b"GET  /metrics HTTP/1.1\r\n\r\n"), Asked::Malformed);
        assert_eq!(parse(b"\r\n\r\n"), Asked::Malformed);
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nrest"), Some(24));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n"), None);
    }
}
